"""The committed CRD equals the generator's output, is a valid CRD, and accepts the examples."""
from __future__ import annotations

import glob
import os

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ddetr_operator.crd import build_crd, main, render_crd_yaml
from ddetr_operator.validate import validate_job

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRD_FILE = os.path.join(ROOT, "crds", "deformabledetrjobs.yaml")
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*job*.yaml")))


def test_committed_crd_matches_the_generator():
    with open(CRD_FILE, encoding="utf-8") as fh:
        committed = fh.read()
    assert committed == render_crd_yaml(), (
        "crds/deformabledetrjobs.yaml is stale: run `python -m ddetr_operator.crd --write crds/deformabledetrjobs.yaml`")


def test_generator_writes_the_file(tmp_path):
    target = tmp_path / "crd.yaml"
    assert main(["--write", str(target)]) == 0
    assert target.read_text() == render_crd_yaml()


def test_crd_is_a_valid_kubernetes_object():
    kubernetes_validate.validate(yaml.safe_load(render_crd_yaml()), "1.30", strict=True)


def test_experiment_schema_is_the_trainers():
    from deformable_detr.config.jsonschema import experiment_schema
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    experiment = dict(schema["properties"]["spec"]["properties"]["experiment"])
    experiment.pop("description")
    assert experiment == {k: v for k, v in experiment_schema().items() if k != "description"}


def to_json_schema(node):
    """OpenAPI v3.0 (`nullable`) -> JSON Schema (`type: [X, null]`), dropping Kubernetes extensions."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = out["enum"] + [None]
    return out


@pytest.fixture(scope="module")
def cr_validator():
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(to_json_schema(schema))


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_is_accepted_by_the_crd_schema_and_the_operator(path, cr_validator):
    with open(path, encoding="utf-8") as fh:
        job = yaml.safe_load(fh)
    errors = [e.message for e in cr_validator.iter_errors(job)]
    assert errors == []
    assert job["apiVersion"] == "ddetr.dev/v1alpha1" and job["kind"] == "DeformableDetrJob"
    validate_job(job["metadata"]["name"], job["spec"])


@pytest.mark.parametrize("path_and_value", [
    (("spec", "experiment", "model", "backbone"), "resnet_5000"),
    (("spec", "nodes"), 0),
    (("spec", "task"), "dance"),
    (("spec", "artifacts", "uri"), "/local/path"),
    (("spec", "runPolicy", "cleanPodPolicy"), "Sometimes"),
    (("spec", "terminationGracePeriodSeconds"), 10),  # under Kubernetes' own 30 s default
    (("spec", "terminationGracePeriodSeconds"), "3m"),
])
def test_schema_rejects_bad_values(path_and_value, cr_validator):
    path, value = path_and_value
    with open(EXAMPLES[-1], encoding="utf-8") as fh:
        job = yaml.safe_load(fh)
    node = job
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    assert list(cr_validator.iter_errors(job)), f"{'.'.join(path)}={value!r} was accepted"


def test_schema_requires_an_image(cr_validator):
    with open(EXAMPLES[0], encoding="utf-8") as fh:
        job = yaml.safe_load(fh)
    del job["spec"]["image"]
    assert any("image" in e.message for e in cr_validator.iter_errors(job))


def test_printer_columns_point_at_status_fields():
    version = build_crd()["spec"]["versions"][0]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"]:
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] == "status":
            assert parts[1] in status, column
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Nodes", "Epoch", "Done%", "ETA", "Goodput",
                                                                       "Loss", "mAP", "Restarts", "Disruptions", "Age"]


def _walk(node: dict, path: str):
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_with_valid_defaults():
    """What the API server demands of a CRD schema, checked offline (kubernetes-validate does not)."""
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = list(_walk(schema, ""))
    assert len(nodes) > 200
    for path, node in nodes:
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: both kinds of properties"
        if node.get("x-kubernetes-preserve-unknown-fields") or "properties" in node:
            assert node["type"] == "object", path
        assert "$ref" not in node and "oneOf" not in node and "anyOf" not in node, path
        if "default" in node:
            jsonschema.validate(node["default"], to_json_schema(node))
        for key in ("minimum", "maximum"):
            if key in node:
                assert node["type"] in ("integer", "number"), f"{path}: {key} on {node['type']}"


@pytest.mark.parametrize("field, value", [
    ("tolerations", [{"key": "gpu", "operator": "Sometimes"}]),
    ("tolerations", [{"key": "gpu", "operator": "Exists", "effect": "Never"}]),
    ("tolerations", [{"key": "gpu", "tolerationSeconds": "ten"}]),
    ("env", [{"value": "no name"}]),
    ("env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}]),  # no key
    ("resources", {"limits": {"memory": "lots"}}),
    ("resources", {"requests": {"cpu": ["8"]}}),
    ("podSecurityContext", {"runAsUser": "root"}),
    ("securityContext", {"capabilities": {"drop": "ALL"}}),
])
def test_core_v1_fields_are_checked_at_apply(field, value, cr_validator):
    with open(EXAMPLES[0], encoding="utf-8") as fh:
        job = yaml.safe_load(fh)
    job["spec"][field] = value
    assert list(cr_validator.iter_errors(job)), f"spec.{field}={value!r} was accepted"


def test_core_v1_fields_accept_what_kubernetes_accepts(cr_validator):
    with open(EXAMPLES[0], encoding="utf-8") as fh:
        job = yaml.safe_load(fh)
    job["spec"].update(
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                     {"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute", "tolerationSeconds": 60}],
        env=[{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
             {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
             {"name": "D", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}],
        resources={"limits": {"cpu": 8, "memory": "64Gi", "nvidia.com/gpu": 8}, "requests": {"cpu": "500m"}},
        podSecurityContext={"runAsUser": 2000, "seccompProfile": {"type": "RuntimeDefault"}},
        securityContext={"readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}})
    assert [e.message for e in cr_validator.iter_errors(job)] == []


def _rules() -> dict[str, list[dict]]:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return {"root": schema["x-kubernetes-validations"], "spec": schema["properties"]["spec"]["x-kubernetes-validations"]}


def test_cel_rules_keep_the_spec_immutable_but_suspend_and_bound_the_name():
    from ddetr_operator.api import MAX_NAME_LENGTH

    (name_rule,) = _rules()["root"]
    assert name_rule["rule"] == f"self.metadata.name.size() <= {MAX_NAME_LENGTH}"
    immutable = _rules()["spec"][0]["rule"]
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for field in spec["properties"]:  # every field, so one added later is covered too
        if field not in ("runPolicy", "nodes", "gpusPerNode"):
            assert f"self.{field} == oldSelf.{field}" in immutable, field
    assert "self.nodes" not in immutable and "self.gpusPerNode" not in immutable
    resize = _rules()["spec"][1]
    assert "oldSelf.runPolicy.suspend" in resize["rule"] and "!has(self.gangScheduling)" in resize["rule"]
    assert "spec.nodes and spec.gpusPerNode may change only while the job is suspended" in resize["message"]
    for field in ("backoffLimit", "activeDeadlineSeconds", "cleanPodPolicy"):
        assert f"self.runPolicy.{field}" in immutable, field
    assert "suspend" not in immutable and "ttlSecondsAfterFinished" not in immutable
    # A defaulted field reads as its default when runPolicy is absent: adding `runPolicy: {suspend: true}` is no edit.
    assert "? self.runPolicy.backoffLimit : 3" in immutable
    assert any("minAvailable == self.nodes" in r["rule"] for r in _rules()["spec"])


# --- the CRD as the API server sees it: tests/operator/crdcheck runs k8s.io/apiextensions-apiserver's own
# CRD validation (CEL compiled, cost within budget) and evaluates objects against it (schema + CEL) ---

CRDCHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crdcheck")
IMMUTABLE = "spec is immutable once the job exists"
RESIZE_REFUSED = "spec.nodes and spec.gpusPerNode may change only while the job is suspended"


@pytest.fixture(scope="module")
def crdcheck(tmp_path_factory):
    """The checker, built offline from the Go module cache (scripts/build-control-plane.sh fills it)."""
    import shutil
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain: the API server's CRD checks need one")
    binary = tmp_path_factory.mktemp("crdcheck") / "crdcheck"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": os.environ.get("DDETR_CRDCHECK_GOPROXY", "off")}
    result = subprocess.run([go, "build", "-trimpath", "-o", str(binary), "."], cwd=CRDCHECK, env=env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        if "GOPROXY=off" in result.stderr or "module lookup disabled" in result.stderr:
            pytest.skip("k8s.io/apiextensions-apiserver v0.37.2 is not in the Go module cache "
                        "(scripts/build-control-plane.sh fetches it; DDETR_CRDCHECK_GOPROXY=https://proxy.golang.org "
                        "lets the build download it)")
        raise AssertionError(result.stderr[-3000:])

    def run(cases: list[dict]) -> dict:
        import json
        import subprocess as sp

        cases_file = tmp_path_factory.mktemp("cases") / "cases.json"
        cases_file.write_text(json.dumps(cases))
        done = sp.run([str(binary), CRD_FILE, str(cases_file)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    return run


def _example(**changes) -> dict:
    import copy

    with open(os.path.join(ROOT, "examples", "train_job.yaml"), encoding="utf-8") as fh:
        job = yaml.safe_load(fh)
    job["metadata"]["namespace"] = "ml"
    for path, value in changes.items():
        node = job
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = copy.deepcopy(value)
    return job


# name -> (old, new, what the API server says: None = accepted, else a fragment of its error)
API_SERVER_CASES = {
    "the example is accepted": (None, _example(), None),
    "a 40-character name is accepted": (None, _example(metadata__name="a" * 40), None),
    "a 41-character name is refused": (None, _example(metadata__name="a" * 41), "metadata.name: at most 40"),
    "a bad toleration operator is refused": (None, _example(spec__tolerations=[{"key": "k", "operator": "Sometimes"}]),
                                             'Unsupported value: "Sometimes"'),
    "an env var without a name is refused": (None, _example(spec__env=[{"value": "1"}]), "spec.env[0].name: Required"),
    "a bad quantity is refused": (None, _example(spec__resources={"limits": {"memory": "lots"}}),
                                  "spec.resources.limits.memory"),
    "int and string quantities are accepted": (None, _example(spec__resources={"limits": {"cpu": 8, "memory": "8Gi"}}),
                                               None),
    "a partial gang is refused": (None, _example(spec__gangScheduling={"scheduler": "volcano", "minAvailable": 1}),
                                  "minAvailable must equal nodes"),
    "a whole gang is accepted": (None, _example(spec__gangScheduling={"scheduler": "volcano", "minAvailable": 2}), None),
    "suspending is an accepted edit": (_example(), _example(spec__runPolicy__suspend=True), None),
    "suspending a job without runPolicy is accepted": (_example(spec__runPolicy=None),
                                                       _example(spec__runPolicy={"suspend": True}), None),
    "setting the TTL is an accepted edit": (_example(), _example(spec__runPolicy__ttlSecondsAfterFinished=60), None),
    "labels are an accepted edit": (_example(), _example(metadata__labels={"team": "vision"}), None),
    "a new image is refused": (_example(), _example(spec__image="other:2"), IMMUTABLE),
    "more nodes on a running job are refused": (_example(), _example(spec__nodes=4), RESIZE_REFUSED),
    "other GPUs per node on a running job are refused": (_example(), _example(spec__gpusPerNode=2), RESIZE_REFUSED),
    "fewer nodes on a suspended job are accepted": (_example(spec__runPolicy__suspend=True),
                                                    _example(spec__runPolicy__suspend=True, spec__nodes=1), None),
    "resizing while unsuspending is accepted": (_example(spec__runPolicy__suspend=True),
                                                _example(spec__runPolicy__suspend=False, spec__nodes=1,
                                                         spec__gpusPerNode=2), None),
    "resizing while suspending is accepted": (_example(), _example(spec__runPolicy__suspend=True, spec__nodes=3), None),
    "resizing a gang-scheduled job is refused": (
        _example(spec__runPolicy__suspend=True, spec__gangScheduling={"scheduler": "volcano"}),
        _example(spec__runPolicy__suspend=True, spec__gangScheduling={"scheduler": "volcano"}, spec__nodes=1),
        RESIZE_REFUSED),
    "an image change while suspended is still refused": (_example(spec__runPolicy__suspend=True),
                                                         _example(spec__runPolicy__suspend=True, spec__image="o:2"),
                                                         IMMUTABLE),
    "a new backoffLimit is refused": (_example(), _example(spec__runPolicy__backoffLimit=9), IMMUTABLE),
    "a removed deadline is refused": (_example(), _example(spec__runPolicy__activeDeadlineSeconds=None), IMMUTABLE),
    "an edited experiment is refused": (_example(), _example(spec__experiment__train={"num_epochs": 1}), IMMUTABLE),
    "an added nodeSelector is refused": (_example(), _example(spec__nodeSelector={"a": "b"}), IMMUTABLE),
    "an edited affinity is refused": (_example(spec__affinity={"nodeAffinity": {"x": {"a": 1}}}),
                                      _example(spec__affinity={"nodeAffinity": {"x": {"a": 2}}}), IMMUTABLE),
    "another kind of affinity is refused": (_example(spec__affinity={"nodeAffinity": {"x": 1}}),
                                            _example(spec__affinity={"podAntiAffinity": {"x": 1}}), IMMUTABLE),
}


def test_the_api_server_accepts_the_crd_and_applies_its_rules_as_intended(crdcheck):
    result = crdcheck([{"name": name, "old": old, "new": new} for name, (old, new, _) in API_SERVER_CASES.items()])
    assert result["crdErrors"] == []  # compiles, and within the CEL cost budget
    for name, (_, _, expected) in API_SERVER_CASES.items():
        errors = result["cases"][name]
        if expected is None:
            assert errors == [], name
        else:
            assert errors and any(expected in e for e in errors), (name, errors)
