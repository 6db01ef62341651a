"""The Helm chart, rendered by the real Helm engine (helm-python-sdk bundles Helm's Go SDK)
with default and non-default values; every rendered manifest is checked against the
Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail)."""

import pytest
import yaml

from conftest import ROOT

import helm_python as helm  # noqa: E402
import jsonschema  # noqa: E402
import kubernetes_validate  # noqa: E402

CHART = ROOT / "charts" / "thynapse"
KUBE_VERSION = "1.33.0"


def render(values=None, namespace="thynapse"):
    chart = helm.Chart.load(CHART)
    rendered = chart.render(values or {}, name="thynapse", namespace=namespace, is_install=True)
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append(d)
    return docs


def validate_all(docs):
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # prometheus-operator's CRD, not a Kubernetes type
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


# What the operator's code calls (operator/src: controller/{fetch,apply}.rs, the owned
# watches in controller/mod.rs, webhook.rs, leader.rs), resource by resource: the chart
# must grant exactly this. Server-side apply is `patch` (and `create` where it makes the
# object); watching is `list` and `watch`.
OPERATOR_NEEDS = {
    ("thynapse.io", "transmittermeshes"): {"get", "list", "watch"},
    ("thynapse.io", "services"): {"get", "list", "watch"},
    ("thynapse.io", "rooms"): {"get", "list", "watch"},
    ("thynapse.io", "transmittermeshes/status"): {"patch"},
    ("thynapse.io", "services/status"): {"patch"},
    ("thynapse.io", "rooms/status"): {"patch"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch"},
    ("apps", "deployments"): {"list", "watch", "create", "patch", "delete"},
    ("", "services"): {"list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"list", "watch", "create", "patch"},
    ("", "secrets"): {"get", "list", "watch", "create", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"list", "watch", "create", "patch"},
    ("policy", "poddisruptionbudgets"): {"list", "watch", "create", "patch"},
    ("", "pods"): {"list", "watch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}


def granted(rules):
    """{(group, resource): verbs} of RBAC rules (none by resource name here)."""
    out = {}
    for r in rules:
        assert "resourceNames" not in r
        for g in r["apiGroups"]:
            for res in r["resources"]:
                out.setdefault((g, res), set()).update(r["verbs"])
    return out


def test_lint_passes():
    report = helm.lint(CHART, strict=True, kube_version="v1.33.0")
    assert not report.get("errors"), report
    assert not [m for m in report.get("messages", []) if m["severity"] >= 2], report


def test_default_values_render_valid_manifests():
    docs = render()
    validate_all(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted([
        "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "Deployment",
        "MutatingWebhookConfiguration", "Role", "RoleBinding", "Service", "ServiceAccount",
    ])
    deployment = by_kind(docs, "Deployment")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    # The image the Dockerfile builds, tagged with the chart's appVersion.
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container["image"] == f"thynapse/thynapse:{chart['appVersion']}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["THYNAPSE_WEBHOOK_CONFIGURATION"] == "thynapse"
    assert env["THYNAPSE_WEBHOOK_DNS_NAMES"].startswith("thynapse.thynapse.svc")
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    webhook = by_kind(docs, "MutatingWebhookConfiguration")[0]["webhooks"][0]
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["rules"][0]["resources"] == ["pods"] and webhook["rules"][0]["operations"] == ["CREATE"]
    assert webhook["clientConfig"]["service"] == {"name": "thynapse", "namespace": "thynapse", "path": "/mutate", "port": 443}
    # Least privilege: exactly what the code calls (see the table), cluster-wide when
    # every namespace is watched; the webhook configuration only by name.
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    assert granted(roles["thynapse"]["rules"]) == OPERATOR_NEEDS
    assert roles["thynapse-webhook"]["rules"] == [{
        "apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
        "resourceNames": ["thynapse"], "verbs": ["get", "update"]}]
    own = by_kind(docs, "Role")[0]
    assert own["metadata"]["namespace"] == "thynapse"
    assert granted(own["rules"]) == {("coordination.k8s.io", "leases"): {"get", "create", "update"},
                                     ("", "secrets"): {"get", "create"}}


def test_non_default_values():
    docs = render({
        "image": {"repository": "registry.example/thynapse", "tag": "dev"},
        "operator": {"replicas": 1, "leaderElection": False, "watchNamespace": "apps"},
        "webhook": {"failurePolicy": "Fail", "tls": {"secretName": "thynapse-tls", "caBundle": "Q0E="}},
        "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    }, namespace="platform")
    validate_all(docs)
    # One namespace watched: a Role there, no ClusterRole at all (no generated
    # certificate, no leader election: nothing in the operator's own namespace either).
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    [role] = by_kind(docs, "Role")
    assert role["metadata"]["namespace"] == "apps" and granted(role["rules"]) == OPERATOR_NEEDS
    [binding] = by_kind(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == "apps"
    assert binding["subjects"][0]["namespace"] == "platform"
    deployment = by_kind(docs, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == "registry.example/thynapse:dev"
    assert env["THYNAPSE_TLS_CERT"] == "/tls/tls.crt" and env["THYNAPSE_NAMESPACE"] == "apps"
    assert env["THYNAPSE_LEADER_ELECTION"] == "false"
    assert pod["volumes"] == [{"name": "tls", "secret": {"secretName": "thynapse-tls"}}]
    webhook = by_kind(docs, "MutatingWebhookConfiguration")[0]["webhooks"][0]
    assert webhook["failurePolicy"] == "Fail" and webhook["clientConfig"]["caBundle"] == "Q0E="
    # Only the watched namespace's pods reach the webhook.
    assert webhook["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}
    monitors = by_kind(docs, "PodMonitor")
    assert len(monitors) == 2 and monitors[0]["metadata"]["labels"]["release"] == "prom"
    assert all(d["metadata"].get("namespace", "platform") == "platform" for d in docs if d["kind"] not in ("Role", "RoleBinding"))


def test_webhook_can_be_disabled():
    docs = render({"webhook": {"enabled": False}})
    validate_all(docs)
    assert not by_kind(docs, "MutatingWebhookConfiguration")
    env = {e["name"]: e.get("value") for e in by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["THYNAPSE_NO_WEBHOOK"] == "true"


def test_chart_crds_are_the_generated_ones():
    for path in (ROOT / "crds").glob("*.yaml"):
        assert (CHART / "crds" / path.name).read_text() == path.read_text()


def crd_schemas():
    """Each kind's openAPIV3Schema, from the generated CRDs."""
    out = {}
    for path in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        out[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return out


def test_examples_validate_against_the_crd_schemas():
    """The examples against the CRDs' OpenAPI schemas (JSON Schema; the real API server
    checks them too in test_operator.py), and a broken manifest fails the same check."""
    schemas = crd_schemas()
    assert set(schemas) == {"TransmitterMesh", "Service", "Room"}
    checked = 0
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                assert d["apiVersion"] == "thynapse.io/v1alpha1", path
                jsonschema.validate(d, schemas[d["kind"]])
                checked += 1
    assert checked >= 3
    broken = {"apiVersion": "thynapse.io/v1alpha1", "kind": "TransmitterMesh",
              "metadata": {"name": "x"}, "spec": {"replicas": 0}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schemas["TransmitterMesh"])
    too_many = dict(broken, spec={"replicas": 241})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(too_many, schemas["TransmitterMesh"])
