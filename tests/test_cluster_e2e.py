"""End to end on a real cluster: set THYNAPSE_E2E_KUBECONFIG to a kubeconfig whose cluster
(Kubernetes >= 1.29) has the chart installed with an image it can pull:

    helm install thynapse charts/thynapse -n thynapse --create-namespace \\
        --set image.repository=<your registry>/thynapse
    THYNAPSE_E2E_KUBECONFIG=~/.kube/config python3 -m pytest tests/test_cluster_e2e.py

It creates a namespace, applies the demo mesh, waits for the transmitters, starts a cell
pod and publishes through its sidecar with redis-cli. Skipped when the variable is unset
(this machine has no cluster).
"""

import os
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, wait_for

KUBECONFIG = os.environ.get("THYNAPSE_E2E_KUBECONFIG")
pytestmark = [
    pytest.mark.skipif(not KUBECONFIG, reason="set THYNAPSE_E2E_KUBECONFIG to run against a real cluster"),
    pytest.mark.may_skip_in_ci,
]


@pytest.fixture
def namespace():
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=KUBECONFIG)
    name = f"thynapse-e2e-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name}})
    yield api_client, name
    core.delete_namespace(name)


def test_demo_mesh_runs_and_a_cell_publishes(namespace):
    from kubernetes import client
    from kubernetes.stream import stream

    api_client, ns = namespace
    crs = client.CustomObjectsApi(api_client)
    plural = {"TransmitterMesh": "transmittermeshes", "Service": "services", "Room": "rooms"}
    for path in sorted((ROOT / "examples" / "demo").glob("*.yaml")):
        for d in yaml.safe_load_all(Path(path).read_text()):
            if d:
                crs.create_namespaced_custom_object("thynapse.io", "v1alpha1", ns, plural[d["kind"]], d)

    def ready():
        mesh = crs.get_namespaced_custom_object("thynapse.io", "v1alpha1", ns, "transmittermeshes", "demo")
        conds = (mesh.get("status") or {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    wait_for(ready, timeout=300, interval=2, what="mesh Ready")
    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(ns, {
        "metadata": {"name": "cell", "labels": {"thynapse.io/service": "workers"}},
        "spec": {"containers": [{"name": "app", "image": "redis:7", "command": ["sleep", "3600"]}]},
    })
    pod = wait_for(lambda: (p := core.read_namespaced_pod("cell", ns)).status.phase == "Running" and p,
                   timeout=300, interval=2, what="cell running")
    assert pod.spec.init_containers[0].name == "thynapse-sidecar"
    out = stream(core.connect_get_namespaced_pod_exec, "cell", ns, container="app",
                 command=["redis-cli", "-p", "6379", "ping"], stderr=True, stdout=True)
    assert "PONG" in out
    out = stream(core.connect_get_namespaced_pod_exec, "cell", ns, container="app",
                 command=["redis-cli", "-p", "6379", "spublish", "{lobby}chat", "hello"], stderr=True, stdout=True)
    assert out.strip().isdigit()
    wait_for(lambda: len(crs.get_namespaced_custom_object("thynapse.io", "v1alpha1", ns, "rooms", "lobby")
                         .get("status", {}).get("transmitters", [])) == 2, timeout=120, what="lobby placed")
