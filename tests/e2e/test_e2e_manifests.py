"""What the cluster suite applies, checked without a cluster: every manifest against the
Kubernetes schemas, the DeformableDetrJobs against the CRD and the operator's own
validation, and the dataset script + embedded experiment by a real (tiny) CPU training run."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kube_validate

import e2e_manifests as m

REPO = Path(__file__).resolve().parents[2]
KUBE_VERSION = "1.30.0"
NAMESPACE = "ddetr-e2e-test"


def _crd_schema() -> dict:
    crd = yaml.safe_load((REPO / "crds" / "deformabledetrjobs.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _all_plain_manifests() -> list[dict]:
    return [*m.s3_store(NAMESPACE), *m.dataset_daemonset(NAMESPACE),
            m.helper_job(NAMESPACE, "make-bucket", m.MAKE_BUCKET),
            m.helper_job(NAMESPACE, "list-objects", m.list_objects_code("demo/"))]


@pytest.mark.parametrize("manifest", _all_plain_manifests(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_helper_manifests_are_valid_kubernetes(manifest):
    kube_validate.validate(manifest, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("epochs", [3, 8])
def test_training_jobs_pass_the_crd_schema_and_the_operator(epochs):
    validate = pytest.importorskip("ddetr_operator.validate", reason="the operator package is not installed")
    render = pytest.importorskip("ddetr_operator.render")
    api = pytest.importorskip("ddetr_operator.api")
    job = m.training_job(NAMESPACE, f"e2e-{epochs}", num_epochs=epochs)
    jsonschema.validate(job, _crd_schema())
    # The suite's installs allow the dataset's hostPath (trainer.allowedHostPaths), as an admin would.
    policy = validate.Policy(allowed_host_paths=(m.DATA_HOST_PATH,))
    experiment = validate.validate_job(job["metadata"]["name"], job["spec"], policy)
    assert experiment.results_dir == f"s3://{m.BUCKET}/e2e-{epochs}"
    job["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    worker_job = render.render_worker_job(api.resolve(job), attempt=0)
    for child in (render.render_service(api.resolve(job)), render.render_configmap(api.resolve(job), experiment), worker_job):
        kube_validate.validate(child, KUBE_VERSION, strict=True)
    pod = worker_job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == m.TRAINER_SERVICE_ACCOUNT
    assert worker_job["spec"]["completions"] == 2


def test_the_crd_rejects_a_broken_job():
    job = m.training_job(NAMESPACE, "broken", num_epochs=1)
    job["spec"]["artifacts"]["uri"] = "http://not-s3/bucket"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, _crd_schema())


def _local_experiment(tmp_path: Path) -> dict:
    """The e2e job's experiment with its data drawn by make_dataset.py into a temp folder."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(m.DATASET_SCRIPT), str(data)], check=True, timeout=60)
    experiment = copy.deepcopy(m.training_job(NAMESPACE, "local", num_epochs=1)["spec"]["experiment"])
    spec = yaml.safe_load(yaml.safe_dump(experiment).replace(m.DATA_MOUNT + "/", str(data) + "/"))
    spec["results_dir"] = str(tmp_path / "results")
    return spec


def test_dataset_script_output_loads_through_the_trainers_dataset(tmp_path):
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.data import build_dataset

    spec = _local_experiment(tmp_path)
    coco = json.loads(Path(spec["dataset"]["train_data_sources"][0]["json_file"]).read_text())
    assert len(coco["images"]) == 16 and coco["annotations"]
    assert {c["id"] for c in coco["categories"]} == {1, 2, 3}
    dataset = build_dataset(spec_from_dict(spec), "train")
    image, target = dataset[0]
    assert image.shape[0] == 3 and len(target["labels"]) == len(target["boxes"]) > 0


@pytest.mark.slow
def test_dataset_script_and_experiment_train_on_the_cpu(tmp_path):
    """The e2e job's exact experiment (data paths moved to a temp folder) trains one epoch."""
    spec = _local_experiment(tmp_path)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = subprocess.run([sys.executable, "-m", "deformable_detr", "train", "-e", str(spec_path)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads((tmp_path / "results" / "train" / "status.json").read_text())
    assert status["epoch"] >= 0 and status["last_checkpoint"]
