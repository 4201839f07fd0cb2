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
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Nodes", "Epoch", "mAP", "Restarts", "Age"]


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
