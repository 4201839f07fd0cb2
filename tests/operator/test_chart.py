"""The Helm chart: lint, render with default and non-default values, validate every rendered
manifest against the Kubernetes schemas, and check what the chart promises (security,
probes, least-privilege RBAC that still covers what the operator creates, schema checks)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kube_validate
from toolbox import TOOLS_BIN, find_tool

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "deformable-detr-operator"
KUBE_VERSION = "1.30.0"

# Values that switch on every optional part and take every non-default branch.
NON_DEFAULT_VALUES = {
    "fullnameOverride": "ddetr",
    "image": {"repository": "registry.example.com/ml/ddetr-operator", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {"verbose": True, "reconcileIntervalSeconds": 5, "fullPassSeconds": 60, "healthPort": 8181,
                 "metricsPort": 9191, "extraEnv": [{"name": "EXTRA", "value": "1"}]},
    "watch": {"namespaces": ["team-a", "team-b"]},
    "rbac": {"create": True, "podGroups": False, "readSecretsClusterWide": True},
    "trainer": {"allowedHostPaths": ["/mnt/datasets", "/data"]},
    "serviceAccount": {"create": True, "name": "ddetr-op", "annotations": {"a": "b"}},
    "trainerServiceAccount": {"create": True, "name": "trainer",
                              "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "podLabels": {"team": "vision"},
    "podAnnotations": {"note": "x"},
    "metrics": {"service": {"type": "NodePort", "port": 9100, "annotations": {"prometheus.io/scrape": "true"}}},
    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus-stack"}},
    "podMonitor": {"enabled": True, "interval": "10s", "labels": {"release": "kube-prometheus-stack"}},
    "dashboards": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "DDETR"}},
}


HELM = find_tool("helm")
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm binary (scripts/test-deps.d/helm.sh installs one)")


def _helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def _values_file(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _render(tmp_path: Path, values: dict | None = None, namespace: str = "ddetr-system",
            include_crds: bool = False) -> list[dict]:
    args = ["template", "ddetr", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    if values is not None:
        args += ["--values", _values_file(tmp_path, values)]
    if include_crds:
        args.append("--include-crds")
    docs = yaml.safe_load_all(_helm(*args).stdout)
    return [doc for doc in docs if doc]


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def _one(docs: list[dict], kind: str) -> dict:
    found = _by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _validate_all(docs: list[dict]) -> None:
    """Every core manifest against the Kubernetes schemas (strict: unknown fields fail)."""
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            _check_monitor(doc)
            continue
        try:
            kube_validate.validate(doc, KUBE_VERSION, strict=True)
        except kube_validate.ValidationError as error:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']}: {error.message}") from error


NODE_MODELS = TOOLS_BIN.parent / "node"
MONITOR_VALIDATOR = """
const kinds = {
  ServiceMonitor: (await import("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor")).ServiceMonitor,
  PodMonitor: (await import("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor")).PodMonitor,
};
const doc = JSON.parse(process.argv[1]);
new kinds[doc.kind](doc).validate();
"""


def _validate_monitor_with_prometheus_operator_types(doc: dict) -> bool:
    """Validate against the Prometheus Operator's own API types (npm @kubernetes-models/prometheus-operator,
    generated from its Go structs); False when node or the package is missing."""
    node = shutil.which("node")
    if node is None or not (NODE_MODELS / "node_modules" / "@kubernetes-models" / "prometheus-operator").exists():
        return False
    result = subprocess.run([node, "--input-type=module", "-e", MONITOR_VALIDATOR, json.dumps(doc)],
                            cwd=NODE_MODELS, capture_output=True, text=True, timeout=60)
    errors = [line for line in result.stderr.splitlines() if "ValidationError" in line]
    assert result.returncode == 0, f"{doc['kind']}: {errors or result.stderr[-1500:]}"
    return True


def _check_monitor(doc: dict) -> None:
    """kubernetes-validate has no Prometheus Operator schemas: validate with the operator's own
    types where they are installed, and check the fields we rely on either way."""
    assert doc["kind"] in ("ServiceMonitor", "PodMonitor")
    _validate_monitor_with_prometheus_operator_types(doc)
    kube_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                           KUBE_VERSION, strict=True)
    endpoints = doc["spec"]["endpoints" if doc["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
    assert endpoints and all(e["port"] and e["path"] == "/metrics" for e in endpoints)
    assert doc["spec"]["selector"]


def _crd() -> dict:
    return yaml.safe_load((REPO / "crds" / "deformabledetrjobs.yaml").read_text())


# --- files that must stay equal to their top-level sources (Helm reads only inside the chart:
# the chart holds symbolic links to them, which Helm follows and `helm package` resolves) ---

def test_chart_crds_equal_top_level_crds():
    top = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert top, "crds/ holds no CRD"
    assert chart == top, "charts/.../crds must hold exactly the top-level crds/ files (run `make sync-chart`)"
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/.../crds/{name} differs from crds/{name}: run `make sync-chart`")


def test_chart_dashboards_equal_top_level_dashboards():
    top = sorted(p.name for p in (REPO / "dashboards").glob("*.json"))
    chart = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert top and chart == top, "charts/.../dashboards must mirror dashboards/ (run `make sync-chart`)"
    for name in top:
        assert (CHART / "dashboards" / name).read_bytes() == (REPO / "dashboards" / name).read_bytes()


# Blocks documented as a whole (their insides are Kubernetes fields, not chart settings).
WHOLE_BLOCKS = {"resources", "podSecurityContext", "securityContext", "probes.liveness", "probes.readiness"}


def test_every_value_is_documented_and_in_the_schema():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()

    def walk(node: dict, schema_node: dict, path: str) -> None:
        for key, value in node.items():
            dotted = f"{path}{key}"
            assert key in schema_node.get("properties", {}), f"{dotted} is not in values.schema.json"
            index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:")
                         and _indent_path(lines, i) == dotted)
            assert lines[index - 1].strip().startswith("#"), f"{dotted} has no comment in values.yaml"
            child_schema = schema_node["properties"][key]
            if isinstance(value, dict) and child_schema.get("properties") and dotted not in WHOLE_BLOCKS:
                walk(value, child_schema, dotted + ".")

    walk(values, schema, "")


def _indent_path(lines: list[str], index: int) -> str:
    """The dotted path of the YAML key on line `index`, from indentation."""
    parts, indent = [], len(lines[index]) - len(lines[index].lstrip())
    parts.append(lines[index].strip().split(":")[0])
    for line in reversed(lines[:index]):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-"):
            continue
        line_indent = len(line) - len(line.lstrip())
        if line_indent < indent:
            parts.append(stripped.split(":")[0])
            indent = line_indent
    return ".".join(reversed(parts))


# --- helm lint / template ---

@needs_helm
def test_helm_lint_default_and_non_default(tmp_path):
    _helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION)
    _helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION,
          "--values", _values_file(tmp_path, NON_DEFAULT_VALUES))


@needs_helm
def test_default_render_is_valid_and_secure(tmp_path):
    docs = _render(tmp_path, include_crds=True)
    _validate_all(docs)
    kinds = sorted(doc["kind"] for doc in docs)
    dashboard_count = len(list((REPO / "dashboards").glob("*.json")))
    assert kinds == sorted(["CustomResourceDefinition", "ServiceAccount", "ServiceAccount", "ClusterRole",
                            "ClusterRoleBinding", "Service", "Deployment", *["ConfigMap"] * dashboard_count])
    assert _one(docs, "CustomResourceDefinition") == _crd()

    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in container["args"]
    assert not any(arg.startswith("--namespace") for arg in container["args"])  # cluster-wide
    assert "--no-read-secrets" in container["args"]  # the ClusterRole grants no Secrets
    assert not any(arg.startswith("--allowed-host-path") for arg in container["args"])  # no hostPath
    assert pod["serviceAccountName"] == _one(docs, "Deployment")["metadata"]["name"]

    service = _one(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics" and "metrics" in ports

    trainer_sa = [sa for sa in _by_kind(docs, "ServiceAccount") if sa["metadata"]["name"] == "deformable-detr-trainer"]
    assert trainer_sa and trainer_sa[0]["automountServiceAccountToken"] is False

    dashboards = _by_kind(docs, "ConfigMap")
    for configmap in dashboards:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        (name, text), = configmap["data"].items()
        assert json.loads(text) == json.loads((REPO / "dashboards" / name).read_text())


@needs_helm
def test_non_default_render_is_valid_and_namespaced(tmp_path):
    docs = _render(tmp_path, NON_DEFAULT_VALUES)
    _validate_all(docs)
    deployment = _one(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ml/ddetr-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert "--namespace=team-a" in container["args"] and "--namespace=team-b" in container["args"]
    assert "--verbose" in container["args"] and "--reconcile-interval=5" in container["args"]
    assert "--liveness=http://0.0.0.0:8181/healthz" in container["args"]
    assert "--allowed-host-path=/mnt/datasets" in container["args"] and "--allowed-host-path=/data" in container["args"]
    assert "--no-read-secrets" not in container["args"]  # the Roles grant Secrets `get` in their namespaces
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8181, "metrics": 9191}

    # Namespaced mode: job/child permissions only through Roles in the listed namespaces.
    roles = _by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in _by_kind(docs, "RoleBinding")) == ["team-a", "team-b"]
    assert not _by_kind(docs, "ClusterRole") and not _by_kind(docs, "ClusterRoleBinding")
    assert not any("podgroups" in rule["resources"] for rule in roles[0]["rules"])

    trainer_namespaces = sorted(sa["metadata"]["namespace"] for sa in _by_kind(docs, "ServiceAccount")
                                if sa["metadata"]["name"] == "trainer")
    assert trainer_namespaces == ["ddetr-system", "team-a", "team-b"]

    assert _one(docs, "Service")["spec"]["type"] == "NodePort"
    service_monitor = _one(docs, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert service_monitor["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    pod_monitor = _one(docs, "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    for configmap in _by_kind(docs, "ConfigMap"):
        assert configmap["metadata"]["namespace"] == "monitoring"
        assert configmap["metadata"]["annotations"] == {"grafana_folder": "DDETR"}


@needs_helm
@pytest.mark.parametrize("values, field", [
    ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ({"operator": {"healthPort": 70000, "metricsPort": 9090, "reconcileIntervalSeconds": 10}}, "operator.healthPort"),
    ({"operator": {"healthPort": 8080, "metricsPort": 9090, "reconcileIntervalSeconds": 0}},
     "operator.reconcileIntervalSeconds"),
    ({"watch": {"namespaces": ["Not_A_Namespace"]}}, "watch.namespaces"),
    ({"securityContext": {"readOnlyRootFilesystem": False, "allowPrivilegeEscalation": False}},
     "securityContext.readOnlyRootFilesystem"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "podSecurityContext.runAsNonRoot"),
    ({"serviceMonitor": {"enabled": "yes"}}, "serviceMonitor.enabled"),
    ({"podMonitor": {"enabled": True, "interval": "often"}}, "podMonitor.interval"),
    ({"metrics": {"service": {"type": "LoadBalancer", "port": 9090}}}, "metrics.service.type"),
    ({"dashbords": {"enabled": True}}, "dashbords"),
    ({"trainer": {"allowedHostPaths": ["mnt/relative"]}}, "trainer.allowedHostPaths"),
    ({"trainer": {"allowedHostPaths": ["/mnt/../etc"]}}, "trainer.allowedHostPaths"),
    ({"rbac": {"create": True, "readSecretsClusterWide": "yes"}}, "rbac.readSecretsClusterWide"),
])
def test_schema_rejects_bad_values(tmp_path, values, field):
    result = _helm("template", "ddetr", str(CHART), "--values", _values_file(tmp_path, values), check=False)
    assert result.returncode != 0, f"bad value {values} was accepted"
    assert field.split(".")[-1] in result.stderr, result.stderr


# --- RBAC covers exactly what the operator renders, and no more than it needs ---

def _rendered_children() -> list[dict]:
    render = pytest.importorskip("ddetr_operator.render", reason="the operator package is not installed")
    api = pytest.importorskip("ddetr_operator.api")
    from deformable_detr.config.loader import spec_from_dict

    job = {"apiVersion": "ddetr.dev/v1alpha1", "kind": "DeformableDetrJob",
           "metadata": {"name": "demo", "namespace": "team-a", "uid": "0000"},
           "spec": {"image": "trainer:latest", "nodes": 2, "gpusPerNode": 0,
                    "gangScheduling": {"scheduler": "volcano"}, "experiment": {}}}
    experiment = spec_from_dict({})
    children = [render.render_service(api.resolve(job)), render.render_configmap(api.resolve(job), experiment),
                render.render_worker_job(api.resolve(job), attempt=0), render.render_podgroup(api.resolve(job))]
    return [child for child in children if child]


def _plural(kind: str) -> str:
    if kind.endswith("y"):
        return kind.lower()[:-1] + "ies"
    return kind.lower() + ("es" if kind.endswith("s") else "s")


# (group, resource) -> the verbs the operator uses, from its calls (kube.py, handlers.py) and kopf's.
def _expected_rbac(crd: dict, pod_groups: bool = True, secrets: bool = False) -> dict[tuple[str, str], set[str]]:
    group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
    expected = {
        (group, plural): {"get",  # kube.get_job: each pass reads its job fresh
                          "list", "watch",  # kopf.on.event
                          "delete",  # ttlSecondsAfterFinished
                          "patch"},  # kopf removing the finalizer older operator versions left
        (group, f"{plural}/status"): {"patch"},  # kube.patch_status
        # blockOwnerDeletion on children, under the OwnerReferencesPermissionEnforcement admission plugin
        (group, f"{plural}/finalizers"): {"update"},
        ("", "services"): {"get", "create"}, ("", "configmaps"): {"get", "create"},
        ("", "pods"): {"list", "watch", "delete"}, ("batch", "jobs"): {"list", "watch", "create", "patch", "delete"},
        ("", "events"): {"create",  # kube.post_event
                         "list"},  # FailedCreate of a worker Job (Pod Security, quota) is only an event
        ("networking.k8s.io", "networkpolicies"): {"get", "create"},  # spec.networkPolicy
    }
    if pod_groups:
        expected.update({("scheduling.k8s.io", "podgroups"): {"get", "create"},
                         ("scheduling.volcano.sh", "podgroups"): {"get", "create"},
                         ("scheduling.x-k8s.io", "podgroups"): {"get", "create"}})
    if secrets:
        expected[("", "secrets")] = {"get"}
    return expected


def _granted(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


@needs_helm
def test_rbac_grants_exactly_the_operators_calls_and_no_secrets_cluster_wide_by_default(tmp_path):
    """The ClusterRole grants each verb the operator (kube.py, handlers.py, kopf) uses and nothing else:
    no `get` on Secrets cluster-wide unless rbac.readSecretsClusterWide; its children all covered;
    nothing that escalates (no wildcard, RBAC objects, pods/exec, pod creation outside a Job)."""
    crd = _crd()
    rules = _one(_render(tmp_path), "ClusterRole")["rules"]
    assert _granted(rules) == _expected_rbac(crd)
    assert all("*" not in rule["verbs"] and "*" not in rule["apiGroups"] and "*" not in rule["resources"]
               for rule in rules)
    for child in _rendered_children():
        child_group = child["apiVersion"].rpartition("/")[0]
        assert "create" in _granted(rules)[(child_group, _plural(child["kind"]))], f"create {child['kind']}"

    opted_in = _one(_render(tmp_path, {"rbac": {"create": True, "readSecretsClusterWide": True}}), "ClusterRole")
    assert _granted(opted_in["rules"]) == _expected_rbac(crd, secrets=True)


@needs_helm
def test_rbac_in_namespaced_mode_grants_secrets_get_only_in_the_watched_namespaces(tmp_path):
    """With watch.namespaces: a Role per namespace with the same calls plus `get` on Secrets (the S3
    credentials a job names, for its progress); no cluster-wide grant at all."""
    docs = _render(tmp_path, {"watch": {"namespaces": ["team-a", "team-b"]}, "rbac": {"create": True, "podGroups": False}})
    assert not _by_kind(docs, "ClusterRole")
    for role in _by_kind(docs, "Role"):
        assert _granted(role["rules"]) == _expected_rbac(_crd(), pod_groups=False, secrets=True)


@needs_helm
def test_pod_monitor_selects_the_pods_the_operator_renders(tmp_path):
    docs = _render(tmp_path, {"podMonitor": {"enabled": True}})
    selector = _one(docs, "PodMonitor")["spec"]["selector"]
    worker_job = next(c for c in _rendered_children() if c["kind"] == "Job")
    pod_labels = worker_job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "Exists" and expression["key"] in pod_labels
    port_names = {p["name"] for p in worker_job["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert _one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] in port_names


@needs_helm
@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_operator_accepts_the_charts_arguments(tmp_path, values):
    """The Deployment's args parse with the operator's real command line, to the chart's values."""
    entry = pytest.importorskip("ddetr_operator.__main__", reason="the operator package is not installed")
    docs = _render(tmp_path, values)
    container = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = entry.parse_args(container["args"])
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    if values:
        chart_values.update(values)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.metrics_port == ports["metrics"] == chart_values["operator"]["metricsPort"]
    assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    assert args.namespaces == chart_values["watch"]["namespaces"]
    assert args.reconcile_interval == chart_values["operator"]["reconcileIntervalSeconds"]
    assert args.full_pass_every == chart_values["operator"]["fullPassSeconds"]
    assert args.allowed_host_paths == chart_values["trainer"]["allowedHostPaths"]
    assert args.read_secrets is bool(chart_values["watch"]["namespaces"] or chart_values["rbac"]["readSecretsClusterWide"])


KUBE_CLIENT_VERBS = {"read": "get", "list": "list", "create": "create", "delete": "delete", "patch": "patch",
                     "replace": "update"}


@needs_helm
def test_rbac_grants_every_core_and_batch_call_the_operator_makes(tmp_path):
    """Read the operator's Kubernetes client calls from its source and check each is allowed."""
    source = (REPO / "operator" / "ddetr_operator" / "kube.py").read_text()
    calls = set(re.findall(r"self\.(core|batch)\.(read|list|create|delete|patch|replace)_namespaced_(\w+?)\b", source))
    assert calls, "found no Kubernetes client calls in kube.py"
    for namespaced in (False, True):
        values = {"watch": {"namespaces": ["team-a"]}} if namespaced else None
        docs = _render(tmp_path, values)
        rules = [rule for doc in docs if doc["kind"] in ("ClusterRole", "Role") for rule in doc["rules"]]
        for api, method, resource in sorted(calls):
            if resource == "secret" and not namespaced:
                continue  # cluster-wide the chart runs it with --no-read-secrets (no Secret access)
            group = "" if api == "core" else "batch"
            plural = resource.replace("_", "") + "s"
            verb = KUBE_CLIENT_VERBS[method]
            assert any(group in r["apiGroups"] and plural in r["resources"] and verb in r["verbs"] for r in rules), (
                f"kube.py calls {method}_namespaced_{resource} but the chart does not grant {verb} {plural}")


@needs_helm
def test_monitor_validator_catches_a_bad_monitor(tmp_path):
    """The Prometheus Operator type check is real: a mistyped field fails it."""
    docs = _render(tmp_path, {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}})
    pod_monitor = _one(docs, "PodMonitor")
    if not _validate_monitor_with_prometheus_operator_types(pod_monitor):
        pytest.skip("no node or @kubernetes-models/prometheus-operator (scripts/test-deps.d/helm.sh installs it)")
    assert _validate_monitor_with_prometheus_operator_types(_one(docs, "ServiceMonitor"))
    pod_monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] = "yes"
    with pytest.raises(AssertionError, match="honorLabels must be boolean"):
        _validate_monitor_with_prometheus_operator_types(pod_monitor)


@needs_helm
def test_two_replicas_elect_a_leader_through_a_lease_in_the_release_namespace_only(tmp_path):
    docs = _render(tmp_path, {"operator": {"replicas": 2}})
    _validate_all(docs)
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DDETR_LEADER_ELECTION_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    role = _one(docs, "Role")
    assert role["metadata"]["namespace"] == "ddetr-system"
    assert _granted(role["rules"]) == {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
    assert _one(docs, "RoleBinding")["roleRef"]["name"] == role["metadata"]["name"]
    # One replica (the default): no election, no Lease access, Recreate.
    single = _render(tmp_path)
    assert not _by_kind(single, "Role") and _one(single, "Deployment")["spec"]["strategy"]["type"] == "Recreate"
    with pytest.raises(Exception):
        _render(tmp_path, {"operator": {"replicas": 4}})
