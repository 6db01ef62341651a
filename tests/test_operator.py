"""The operator against a real Kubernetes API server (upstream apiextensions-apiserver with
storage for the built-in types; see tests/k8s/cluster.py), driven by the official Python
client: CRDs, schema and CEL validation, the reconcile loop, server-side apply, status,
Events, leader election and the injection webhook over HTTPS.

Nothing runs pods here: no scheduler, kubelet or controller-manager, so StatefulSets are
stored, not started (the tests write their status as a kubelet would report it), and
owner references are checked rather than garbage collection.
"""

import base64
import json
import re
import os
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml

sys.path.insert(0, str(Path(__file__).parent / "k8s"))

from conftest import BINARY, ROOT, Subscriber, mesh_yaml, until_routed, wait_for  # noqa: E402

import kubernetes  # noqa: E402,F401
from kubernetes import client as k8s  # noqa: E402
from kubernetes import config as k8s_config  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

OPERATOR = ROOT / "target" / "release" / "thynapse-operator"
GROUP, VERSION, NS = "thynapse.io", "v1alpha1", "default"

pytestmark = pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
    reason="the test API server is built from Debian packages",
)


@pytest.fixture(scope="module")
def cluster():
    from cluster import ApiServer

    server = ApiServer()
    api_client = k8s_config.new_client_from_config(config_file=str(server.kubeconfig))
    server.client = api_client
    ext = k8s.ApiextensionsV1Api(api_client)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        name = yaml.safe_load(path.read_text())["metadata"]["name"]

        def established():
            crd = ext.read_custom_resource_definition(name)
            return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

        wait_for(established, what=f"{name} established")
    # Custom resources are served once discovery has them.
    crs = k8s.CustomObjectsApi(api_client)
    wait_for(lambda: crs.list_namespaced_custom_object(GROUP, VERSION, NS, "transmittermeshes") is not None,
             what="custom resources served")
    yield server
    server.stop()


def custom(cluster):
    return k8s.CustomObjectsApi(cluster.client)


def create(cluster, doc, dry_run=False):
    plural = {"TransmitterMesh": "transmittermeshes", "Service": "services", "Room": "rooms"}[doc["kind"]]
    kw = {"dry_run": "All"} if dry_run else {}
    return custom(cluster).create_namespaced_custom_object(GROUP, VERSION, NS, plural, doc, field_validation="Strict", **kw)


def doc(kind, name, spec):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize(
    "kind,spec,complaint",
    [
        ("TransmitterMesh", {}, "replicas"),
        ("TransmitterMesh", {"replicas": 0}, "replicas"),
        ("TransmitterMesh", {"replicas": 1, "rendezvous": {"expiryMultiplier": 1}}, "expiryMultiplier"),
        ("TransmitterMesh", {"replicas": 1, "limits": {"maxMessageBytes": 1048576, "clientOutputBufferBytes": 65536}},
         "must hold at least one message"),
        ("TransmitterMesh", {"replicas": 1, "surprise": True}, "surprise"),
        ("Service", {"mesh": "Not_A_Name"}, "spec.mesh"),
        ("Service", {"mesh": "demo", "delivery": [{"pattern": "a.*", "mode": "sometimes"}]}, "mode"),
        ("Room", {"mesh": "demo", "replicas": 0}, "replicas"),
    ],
)
def test_invalid_manifests_are_rejected_by_the_schema(cluster, kind, spec, complaint):
    with pytest.raises(ApiException) as e:
        create(cluster, doc(kind, "bad", spec), dry_run=True)
    assert e.value.status in (400, 422), e.value.body
    assert complaint in e.value.body


def test_examples_are_valid_custom_resources(cluster):
    for path in sorted((ROOT / "examples" / "demo").glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                create(cluster, d, dry_run=True)


def test_room_mesh_is_immutable(cluster):
    create(cluster, doc("Room", "fixed", {"mesh": "demo"}))
    patch = {"spec": {"mesh": "other"}}
    with pytest.raises(ApiException) as e:
        custom(cluster).patch_namespaced_custom_object(GROUP, VERSION, NS, "rooms", "fixed", patch)
    assert "immutable" in e.value.body
    custom(cluster).delete_namespaced_custom_object(GROUP, VERSION, NS, "rooms", "fixed")


def _certs(tmp: Path):
    from cluster import make_certs

    make_certs(tmp)
    return tmp / "server.crt", tmp / "server.key", tmp / "ca.crt"


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    """The operator binary, a real local mesh for room placement, and the demo manifests."""
    tmp = tmp_path_factory.mktemp("operator")
    # A real mesh named like the demo, for the Room controller to ask where rooms live.
    (tmp / "mesh").mkdir()
    (tmp / "mesh" / "mesh.yaml").write_text(
        mesh_yaml(name="demo", replicas=3) + "---\n" + (ROOT / "examples" / "demo" / "rooms.yaml").read_text()
    )
    endpoints = tmp / "endpoints.json"
    # The mesh's token, given to the local mesh and put in the Secret the operator would
    # otherwise generate (it keeps one that exists): the Room controller seals its
    # questions to the rendezvous with it.
    token = os.urandom(24).hex()
    (tmp / "token").write_text(token + "\n")
    k8s.CoreV1Api(cluster.client).create_namespaced_secret(NS, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-token"},
        "data": {"token": base64.b64encode(token.encode()).decode()}})
    up = subprocess.Popen([str(BINARY), "up", "-f", str(tmp / "mesh"), "--endpoints", str(endpoints),
                           "--token-file", str(tmp / "token")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rendezvous = wait_for(lambda: endpoints.exists() and json.loads(endpoints.read_text())["rendezvous"][0]["address"],
                          timeout=30, what="local mesh")
    cert, key, ca = _certs(tmp)
    log = open(tmp / "operator.log", "w")
    proc = subprocess.Popen(
        [str(OPERATOR), "--metrics-bind", "127.0.0.1:0", "--webhook-bind", "127.0.0.1:0",
         "--tls-cert", str(cert), "--tls-key", str(key), "--identity", "test-operator",
         "--rendezvous-override", f"demo={rendezvous}"],
        env={**cluster.env(), "RUST_LOG": "info"}, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    lines = {}
    while len(lines) < 2:
        line = proc.stdout.readline()
        assert line, f"operator exited: {(tmp / 'operator.log').read_text()}"
        kind, url = line.split()
        lines[kind] = url
    for path in sorted((ROOT / "examples" / "demo").glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                create(cluster, d)
    yield {"webhook": lines["WEBHOOK"], "metrics": lines["METRICS"], "ca": ca, "log": tmp / "operator.log", "proc": proc,
           "token": token}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    log.close()
    os.killpg(up.pid, signal.SIGTERM)
    up.wait(timeout=20)


def found(read, *args):
    """`read(*args)`, or None while the object does not exist yet (for wait_for)."""
    try:
        return read(*args)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def get_mesh(cluster):
    return custom(cluster).get_namespaced_custom_object(GROUP, VERSION, NS, "transmittermeshes", "demo")


def condition(obj, type_):
    for c in (obj.get("status") or {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return None


def test_the_operator_creates_everything_a_mesh_owns(cluster, operator):
    apps, core = k8s.AppsV1Api(cluster.client), k8s.CoreV1Api(cluster.client)
    sts = wait_for(lambda: found(apps.read_namespaced_stateful_set, "demo-transmitter", NS), what="StatefulSet")
    assert sts.spec.replicas == 3 and sts.spec.pod_management_policy == "Parallel"
    mesh = get_mesh(cluster)
    owners = [(o.kind, o.name, o.uid, o.controller) for o in sts.metadata.owner_references]
    assert owners == [("TransmitterMesh", "demo", mesh["metadata"]["uid"], True)]
    headless = core.read_namespaced_service("demo-transmitter", NS)
    assert headless.spec.cluster_ip == "None" and headless.spec.publish_not_ready_addresses
    rendezvous = apps.read_namespaced_deployment("demo-rendezvous-0", NS)
    args = rendezvous.spec.template.spec.containers[0].args
    assert "lobby=2" in args and "game=1" in args, "declared Rooms reach the rendezvous"
    assert core.read_namespaced_service("demo-rendezvous-0", NS).spec.ports[0].protocol == "UDP"
    assert "replicas: 3" in core.read_namespaced_config_map("demo-config", NS).data["mesh.yaml"]
    token = core.read_namespaced_secret("demo-token", NS).data["token"]
    assert base64.b64decode(token).decode() == operator["token"], "a token that exists is kept"
    assert k8s.NetworkingV1Api(cluster.client).read_namespaced_network_policy("demo", NS).spec.policy_types == ["Ingress"]
    assert k8s.PolicyV1Api(cluster.client).read_namespaced_pod_disruption_budget("demo-transmitter", NS).spec.max_unavailable == 1
    for obj in [headless, rendezvous, core.read_namespaced_secret("demo-token", NS)]:
        assert obj.metadata.owner_references[0].uid == mesh["metadata"]["uid"]
        assert "thynapse-operator" in [m.manager for m in obj.metadata.managed_fields]

    # Status: not ready while no transmitter is; Ready once the StatefulSet reports them.
    mesh = wait_for(lambda: (m := get_mesh(cluster)).get("status") and m, what="mesh status")
    assert condition(mesh, "Ready")["status"] == "False"
    assert condition(mesh, "Progressing")["status"] == "True"
    assert condition(mesh, "Ready")["observedGeneration"] == mesh["metadata"]["generation"]
    def report_ready():
        # As a kubelet and the StatefulSet controller would; the operator may write the
        # object at the same time, so a stale write (409) is read again and retried.
        sts = apps.read_namespaced_stateful_set("demo-transmitter", NS)
        sts.status = k8s.V1StatefulSetStatus(replicas=3, ready_replicas=3)
        try:
            return apps.replace_namespaced_stateful_set("demo-transmitter", NS, sts)
        except ApiException as e:
            if e.status == 409:
                return None
            raise

    wait_for(report_ready, what="StatefulSet status written")
    mesh = wait_for(lambda: (m := get_mesh(cluster)) and condition(m, "Ready")["status"] == "True" and m, what="Ready")
    assert mesh["status"]["readyTransmitters"] == 3
    assert mesh["status"]["rendezvous"] == "udp://demo-rendezvous-0.default.svc:7400"

    # Events on the mesh.
    events = k8s.EventsV1Api(cluster.client).list_namespaced_event(NS).items
    assert any(e.regarding.name == "demo" and e.reason == "Reconciled" for e in events)

    # The leader holds the lease.
    lease = k8s.CoordinationV1Api(cluster.client).read_namespaced_lease("thynapse-operator", NS)
    assert lease.spec.holder_identity == "test-operator"


def test_changes_are_reconciled_and_foreign_edits_reverted(cluster, operator):
    apps = k8s.AppsV1Api(cluster.client)
    wait_for(lambda: found(apps.read_namespaced_stateful_set, "demo-transmitter", NS), what="StatefulSet")
    patch = {"spec": {"replicas": 4, "rendezvous": {"replicas": 2}}}
    custom(cluster).patch_namespaced_custom_object(GROUP, VERSION, NS, "transmittermeshes", "demo", patch)
    wait_for(lambda: apps.read_namespaced_stateful_set("demo-transmitter", NS).spec.replicas == 4, what="scaled")
    wait_for(lambda: found(apps.read_namespaced_deployment, "demo-rendezvous-1", NS), what="second rendezvous point")
    args = apps.read_namespaced_stateful_set("demo-transmitter", NS).spec.template.spec.containers[0].args
    assert args.count("--rendezvous") == 2
    # Another field manager changes what the operator owns: the next reconcile (triggered
    # by the watch on owned objects) takes it back with a forced apply.
    apps.patch_namespaced_stateful_set("demo-transmitter", NS, {"spec": {"replicas": 9}}, field_manager="someone-else")
    wait_for(lambda: apps.read_namespaced_stateful_set("demo-transmitter", NS).spec.replicas == 4, what="reverted")
    # Scaling the rendezvous down removes the extra point.
    patch = {"spec": {"replicas": 3, "rendezvous": {"replicas": 1}}}
    custom(cluster).patch_namespaced_custom_object(GROUP, VERSION, NS, "transmittermeshes", "demo", patch)

    def pruned():
        names = [d.metadata.name for d in apps.list_namespaced_deployment(NS).items]
        return names == ["demo-rendezvous-0"]

    wait_for(pruned, what="rendezvous point pruned")


def test_room_status_shows_its_placement(cluster, operator):
    def placed():
        room = custom(cluster).get_namespaced_custom_object(GROUP, VERSION, NS, "rooms", "lobby")
        return len((room.get("status") or {}).get("transmitters", [])) == 2 and room

    room = wait_for(placed, timeout=30, what="lobby placed")
    assert condition(room, "Ready")["status"] == "True"
    assert all(t.startswith("demo-") for t in room["status"]["transmitters"])


def test_each_service_gets_its_key_and_transmitters_the_token(cluster, operator):
    """The token stays with the transmitters (mounted from its Secret); each Service's
    cells get only their Service's key, derived from it (docs/security.md)."""
    import hashlib
    import hmac

    core = k8s.CoreV1Api(cluster.client)
    token_secret = wait_for(lambda: found(core.read_namespaced_secret, "demo-token", NS), what="the mesh token")
    token = base64.b64decode(token_secret.data["token"]).strip()
    for service in ("workers", "audit"):
        secret = wait_for(lambda s=service: found(core.read_namespaced_secret, f"{s}-thynapse-key", NS),
                          what=f"{service}'s key")
        expected = hmac.new(token, b"thynapse service " + service.encode(), hashlib.sha256).hexdigest()
        assert base64.b64decode(secret.data["key"]).decode() == expected
        assert secret.metadata.owner_references[0].kind == "Service"
    sts = k8s.AppsV1Api(cluster.client).read_namespaced_stateful_set("demo-transmitter", NS)
    pod = sts.spec.template.spec
    assert pod.volumes[0].secret.secret_name == "demo-token"
    args = pod.containers[0].args
    assert args[args.index("--token-file") + 1] == pod.containers[0].volume_mounts[0].mount_path + "/token"


def test_service_status_counts_running_cells(cluster, operator):
    core = k8s.CoreV1Api(cluster.client)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "worker-a", "labels": {"thynapse.io/service": "workers", "thynapse.io/mesh": "demo"},
                     "annotations": {"thynapse.io/injected": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"},
    }
    core.create_namespaced_pod(NS, pod)

    def counted():
        svc = custom(cluster).get_namespaced_custom_object(GROUP, VERSION, NS, "services", "workers")
        return (svc.get("status") or {}).get("cells") == 1 and svc

    svc = wait_for(counted, timeout=30, what="workers cells = 1")
    assert condition(svc, "Ready")["status"] == "True"


def admission_review(pod):
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "7f0b2891-916f-4ed6-b7cd-27bff1815a8c",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NS, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "oldObject": None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def post_review(operator, pod):
    ctx = ssl.create_default_context(cafile=str(operator["ca"]))
    req = urllib.request.Request(operator["webhook"], data=json.dumps(admission_review(pod)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.loads(r.read())["response"]


def test_webhook_injects_a_native_sidecar_over_https(cluster, operator):
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "workers-", "labels": {"thynapse.io/service": "workers"}},
           "spec": {"containers": [{"name": "app", "image": "app"}]}}
    resp = post_review(operator, pod)
    assert resp["uid"] == "7f0b2891-916f-4ed6-b7cd-27bff1815a8c" and resp["allowed"] is True
    assert resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    init = next(op for op in ops if op["path"] == "/spec/initContainers")["value"][0]
    assert init["name"] == "thynapse-sidecar" and init["restartPolicy"] == "Always"
    assert init["args"][init["args"].index("--resp-bind") + 1] == "127.0.0.1:6379"
    assert init["args"][init["args"].index("--service") + 1] == "workers"
    assert {"op": "add", "path": "/metadata/labels/thynapse.io~1mesh", "value": "demo"} in ops
    assert init["args"][init["args"].index("--service-key-file") + 1] == "/var/run/thynapse/service/key"
    volumes = next(op for op in ops if op["path"] == "/spec/volumes")["value"]
    assert volumes[0]["secret"]["secretName"] == "workers-thynapse-key"
    # Idempotent: a pod that already has the sidecar is left alone.
    pod["spec"]["initContainers"] = [init]
    assert "patch" not in post_review(operator, pod)
    # Pods no Service selects are admitted untouched.
    other = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
             "spec": {"containers": [{"name": "web", "image": "nginx"}]}}
    resp = post_review(operator, other)
    assert resp["allowed"] is True and "patch" not in resp


def test_the_pods_the_operator_writes_run_and_carry_messages(cluster, operator, parts, tmp_path):
    """No kubelet here: the containers of the rendezvous Deployment, the transmitter
    StatefulSet and two injected sidecars run as local processes, with exactly their
    args, the Secrets mounted where their volumes say, and only what a node would
    provide substituted (pod names and IPs, DNS names of Services, node-free ports). They
    must authenticate with those Secrets, link, and carry a message."""
    apps = k8s.AppsV1Api(cluster.client)
    core = k8s.CoreV1Api(cluster.client)
    sts = wait_for(lambda: found(apps.read_namespaced_stateful_set, "demo-transmitter", NS), what="StatefulSet")
    rv_pod = wait_for(lambda: found(apps.read_namespaced_deployment, "demo-rendezvous-0", NS),
                      what="rendezvous Deployment").spec.template.spec

    def mount(volumes, container, into):
        """The Secret volumes of `container`, written where it mounts them (under `into`)."""
        paths = {}
        for m in container.volume_mounts or []:
            volume = next(v for v in volumes if v.name == m.name)
            name = volume.secret.secret_name
            secret = wait_for(lambda n=name: found(core.read_namespaced_secret, n, NS), what=f"Secret {name}")
            d = into / m.name
            d.mkdir()
            for key, value in secret.data.items():
                (d / key).write_bytes(base64.b64decode(value))
            paths[m.mount_path] = str(d)
        return paths

    def node(args, substitutions):
        out = []
        for a in args:
            for old, new in substitutions.items():
                a = a.replace(old, new)
            out.append(a)
        return out

    def free(args):
        """Ports of the pod network become any free loopback port."""
        return [re.sub(r"0\.0\.0\.0:\d+", "127.0.0.1:0", a) for a in args]

    (tmp_path / "rendezvous").mkdir()
    rv_container = rv_pod.containers[0]
    rv = parts(*free(node(rv_container.args, mount(rv_pod.volumes, rv_container, tmp_path / "rendezvous"))))
    local_rv = rv.ready["address"].replace("udp://", "")
    dns = {f"demo-rendezvous-0.{NS}.svc:7400": local_rv, f"demo-rendezvous-0.{NS}.svc.cluster.local:7400": local_rv}
    pod = sts.spec.template.spec
    for i in range(2):
        c = pod.containers[0]
        d = tmp_path / f"transmitter-{i}"
        d.mkdir()
        subs = {"$(POD_NAME)": f"demo-transmitter-{i}", "$(POD_IP)": "127.0.0.1", **dns, **mount(pod.volumes, c, d)}
        parts(*free(node(c.args, subs)))
    cells = []
    for service in ("audit", "workers"):
        review = {"apiVersion": "v1", "kind": "Pod",
                  "metadata": {"name": f"{service}-pod", "labels": {"thynapse.io/service": service}},
                  "spec": {"containers": [{"name": "app", "image": "app"}]}}
        ops = json.loads(base64.b64decode(post_review(operator, review)["patch"]))
        container = next(op for op in ops if op["path"] == "/spec/initContainers")["value"][0]
        volumes = next(op for op in ops if op["path"] == "/spec/volumes")["value"]
        d = tmp_path / service
        d.mkdir()
        mounts = {}
        for m in container["volumeMounts"]:
            volume = next(v for v in volumes if v["name"] == m["name"])
            name = volume["secret"]["secretName"]
            # A kubelet waits for a pod's Secrets to exist; so does this test.
            secret = wait_for(lambda n=name: found(core.read_namespaced_secret, n, NS), what=f"Secret {name}")
            (d / m["name"]).mkdir()
            for key, value in secret.data.items():
                (d / m["name"] / key).write_bytes(base64.b64decode(value))
            mounts[m["mountPath"]] = str(d / m["name"])
        subs = {"$(POD_NAME)": f"{service}-pod", **dns, **mounts, "127.0.0.1:6379": "127.0.0.1:0"}
        cells.append(parts(*free(node(container["args"], subs))))
    audit, workers = (redis.Redis(host="127.0.0.1", port=int(c.ready["resp"].rsplit(":", 1)[1])) for c in cells)
    sub = Subscriber(audit, channels=["through.the.pods"])
    until_routed(workers, "through.the.pods", 1, timeout=30)
    workers.publish("through.the.pods", b"hello")
    sub.wait_count(1, prefix=b"hello")
    sub.pubsub.close()


def test_operator_metrics(cluster, operator):
    wait_for(lambda: get_mesh(cluster).get("status"), what="a reconcile")
    text = urllib.request.urlopen(operator["metrics"], timeout=5).read().decode()
    assert 'thynapse_operator_reconciles_total{controller="transmittermesh",result="ok"}' in text
    assert "thynapse_operator_reconcile_duration_seconds_bucket" in text
    assert "thynapse_operator_leader 1" in text


def test_two_replicas_share_one_generated_certificate_and_both_inject(cluster, operator, tmp_path):
    """With no certificate mounted, replicas generate one into a Secret once and all serve
    it: a caller trusting the Secret's certificate (the CA bundle the operator publishes)
    reaches every replica, and each injects. Each replica used to generate its own and
    overwrite the bundle, so that calls reaching another failed TLS. (The test API server
    serves no webhook configurations, so publishing the bundle is not run here.)"""
    replicas, webhooks = [], []
    try:
        for i in range(2):
            log = open(tmp_path / f"replica-{i}.log", "w")
            replicas.append(subprocess.Popen(
                [str(OPERATOR), "--metrics-bind", "127.0.0.1:0", "--webhook-bind", "127.0.0.1:0",
                 "--identity", f"replica-{i}", "--webhook-dns-names", "127.0.0.1",
                 "--webhook-secret", "thynapse-test-webhook-tls"],
                env={**cluster.env(), "RUST_LOG": "info"}, stdout=subprocess.PIPE, stderr=log, text=True,
            ))
        for i, r in enumerate(replicas):
            line = r.stdout.readline()
            assert line.startswith("WEBHOOK"), f"{line!r}: {(tmp_path / f'replica-{i}.log').read_text()}"
            webhooks.append(line.split()[1])
        secret = k8s.CoreV1Api(cluster.client).read_namespaced_secret("thynapse-test-webhook-tls", NS)
        assert secret.type == "kubernetes.io/tls"
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(base64.b64decode(secret.data["tls.crt"]))
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": "workers-", "labels": {"thynapse.io/service": "workers"}},
               "spec": {"containers": [{"name": "app", "image": "app"}]}}
        for url in webhooks:
            resp = post_review({"webhook": url, "ca": bundle}, pod)
            ops = json.loads(base64.b64decode(resp["patch"]))
            init = next(op for op in ops if op["path"] == "/spec/initContainers")["value"][0]
            assert init["name"] == "thynapse-sidecar", url
    finally:
        for r in replicas:
            r.send_signal(signal.SIGTERM)
            r.wait(timeout=10)


def test_a_rotated_token_rolls_the_pods_and_derives_every_service_key_again(cluster, operator):
    """docs/security.md's rotation, as the operator sees it: each change of the token
    Secret changes the transmitter and rendezvous pod templates (Kubernetes rolls them),
    and once the new token is first every Service's key is derived from it. (Near the end
    of the module: the local mesh keeps the old token, so rooms are not placed after.)"""
    import hashlib
    import hmac

    apps, core = k8s.AppsV1Api(cluster.client), k8s.CoreV1Api(cluster.client)

    def versions():
        sts = apps.read_namespaced_stateful_set("demo-transmitter", NS).spec.template.metadata.annotations
        rv = apps.read_namespaced_deployment("demo-rendezvous-0", NS).spec.template.metadata.annotations
        return sts["thynapse.io/token-version"], rv["thynapse.io/token-version"]

    def set_token(text):
        core.patch_namespaced_secret("demo-token", NS, {"data": {"token": base64.b64encode(text.encode()).decode()}})

    def key_of(service):
        return base64.b64decode(core.read_namespaced_secret(f"{service}-thynapse-key", NS).data["key"]).decode()

    old, new = operator["token"], os.urandom(24).hex()
    before = wait_for(versions, what="token versions")
    assert key_of("workers") == hmac.new(old.encode(), b"thynapse service workers", hashlib.sha256).hexdigest()
    set_token(f"{old}\n{new}")  # 1: every pod accepts both, still proves with the old
    step1 = wait_for(lambda: (lambda v: v[0] != before[0] and v[1] != before[1] and v)(versions()),
                     what="both templates changed")
    set_token(f"{new}\n{old}")  # 2: the new one first
    wait_for(lambda: versions() not in (before, step1), what="both templates changed again")
    expected = hmac.new(new.encode(), b"thynapse service workers", hashlib.sha256).hexdigest()
    wait_for(lambda: key_of("workers") == expected, timeout=30, what="the Service's key derived from the new token")


def test_a_second_replica_waits_and_takes_over(cluster, operator, tmp_path):
    """Two replicas: the second does not reconcile while the first holds the Lease, and
    leads once the first is gone and the Lease expires (15 s)."""
    log = open(tmp_path / "standby.log", "w")
    standby = subprocess.Popen(
        [str(OPERATOR), "--metrics-bind", "127.0.0.1:0", "--no-webhook", "--identity", "standby"],
        env={**cluster.env(), "RUST_LOG": "info"}, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    try:
        metrics_url = standby.stdout.readline().split()[1]

        def leader_gauge():
            text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
            return next(float(l.split()[1]) for l in text.splitlines() if l.startswith("thynapse_operator_leader "))

        wait_for(lambda: leader_gauge() == 0.0, what="standby up and following")
        lease = k8s.CoordinationV1Api(cluster.client).read_namespaced_lease("thynapse-operator", NS)
        assert lease.spec.holder_identity == "test-operator"
        # The leader stops (its lease is not released: the standby waits for it to expire).
        leader = operator["proc"]
        leader.send_signal(signal.SIGTERM)
        leader.wait(timeout=10)
        wait_for(lambda: leader_gauge() == 1.0, timeout=45, interval=0.5, what="standby leads")
        lease = k8s.CoordinationV1Api(cluster.client).read_namespaced_lease("thynapse-operator", NS)
        assert lease.spec.holder_identity == "standby"
        # It reconciles: a change to the mesh reaches the StatefulSet.
        custom(cluster).patch_namespaced_custom_object(GROUP, VERSION, NS, "transmittermeshes", "demo", {"spec": {"replicas": 5}})
        apps = k8s.AppsV1Api(cluster.client)
        wait_for(lambda: apps.read_namespaced_stateful_set("demo-transmitter", NS).spec.replicas == 5, what="standby reconciles")
    finally:
        standby.send_signal(signal.SIGTERM)
        standby.wait(timeout=10)
        log.close()
