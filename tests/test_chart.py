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


def test_lint_passes():
    report = helm.lint(CHART, strict=True, kube_version="v1.33.0")
    assert not report.get("errors"), report
    assert not [m for m in report.get("messages", []) if m["severity"] >= 2], report


def test_default_values_render_valid_manifests():
    docs = render()
    validate_all(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted([
        "ClusterRole", "ClusterRoleBinding", "Deployment", "MutatingWebhookConfiguration",
        "Role", "RoleBinding", "Service", "ServiceAccount",
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
    # Least privilege: the webhook configuration only by name, only to set a generated CA.
    rules = by_kind(docs, "ClusterRole")[0]["rules"]
    hooks = [r for r in rules if "mutatingwebhookconfigurations" in r["resources"]]
    assert hooks == [{"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
                      "resourceNames": ["thynapse"], "verbs": ["get", "update"]}]
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules)
    assert all("delete" not in r["verbs"] for r in rules if "thynapse.io" in r["apiGroups"])
    lease_rules = by_kind(docs, "Role")[0]["rules"]
    assert lease_rules == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}]


def test_non_default_values():
    docs = render({
        "image": {"repository": "registry.example/thynapse", "tag": "dev"},
        "operator": {"replicas": 1, "leaderElection": False, "watchNamespace": "apps"},
        "webhook": {"failurePolicy": "Fail", "tls": {"secretName": "thynapse-tls", "caBundle": "Q0E="}},
        "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    }, namespace="platform")
    validate_all(docs)
    assert not by_kind(docs, "Role"), "no Lease permissions without leader election"
    rules = by_kind(docs, "ClusterRole")[0]["rules"]
    assert not [r for r in rules if "mutatingwebhookconfigurations" in r["resources"]]
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
    monitors = by_kind(docs, "PodMonitor")
    assert len(monitors) == 2 and monitors[0]["metadata"]["labels"]["release"] == "prom"
    assert all(d["metadata"].get("namespace", "platform") == "platform" for d in docs)


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
    too_many = dict(broken, spec={"replicas": 1001})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(too_many, schemas["TransmitterMesh"])
