"""spec.cache: the node-local volume of the trainer's s3:// object cache, rendered into every trainer pod."""
from __future__ import annotations

import kubernetes_validate
import pytest

from ddetr_operator import render
from ddetr_operator.api import resolve
from ddetr_operator.apischema import JobSpecError
from ddetr_operator.validate import Policy, validate_job
from deformable_detr.runtime import object_cache

S3_EXPERIMENT = {"dataset": {
    "num_classes": 4,
    "train_data_sources": [{"image_dir": "s3://datasets/coco/train2017", "json_file": "s3://datasets/coco/train.json"}],
    "val_data_sources": [{"image_dir": "s3://datasets/coco/val2017", "json_file": "s3://datasets/coco/val.json"}]}}


def _pod(job: dict) -> tuple[dict, dict]:
    validate_job(job["metadata"]["name"], job["spec"], Policy())
    worker = render.render_worker_job(resolve(job), 0)
    kubernetes_validate.validate(worker, "1.30", strict=True)
    pod = worker["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _cache_volume(pod: dict) -> dict:
    return next(v for v in pod["volumes"] if v["name"] == "object-cache")


def test_a_job_reading_s3_gets_a_node_disk_cache_by_default_and_no_dataset_volume(make_job, tmp_path, monkeypatch):
    pod, container = _pod(make_job(experiment=S3_EXPERIMENT))
    assert _cache_volume(pod) == {"name": "object-cache", "emptyDir": {"sizeLimit": "50Gi"}}
    assert {"name": "object-cache", "mountPath": render.CACHE_DIR} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[object_cache.CACHE_DIR_ENV] == render.CACHE_DIR and env[object_cache.CACHE_SIZE_ENV] == "50Gi"
    assert [v["name"] for v in pod["volumes"]] == ["dshm", "spec", "object-cache"]  # no dataset volume at all

    # The trainer reads what the operator sets.
    monkeypatch.setenv(object_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(object_cache.CACHE_SIZE_ENV, env[object_cache.CACHE_SIZE_ENV])
    cache = object_cache.node_cache()
    assert cache.root == str(tmp_path / "cache") and cache.max_bytes == 50 * 1024 ** 3


def test_cache_on_memory_or_a_pvc(make_job):
    pod, _ = _pod(make_job(cache={"size": "2Gi", "medium": "Memory"}))
    assert _cache_volume(pod)["emptyDir"] == {"sizeLimit": "2Gi", "medium": "Memory"}
    pod, container = _pod(make_job(cache={"size": "500Gi", "persistentVolumeClaim": {"claimName": "node-cache"}}))
    assert _cache_volume(pod) == {"name": "object-cache", "persistentVolumeClaim": {"claimName": "node-cache"}}
    assert {"name": object_cache.CACHE_SIZE_ENV, "value": "500Gi"} in container["env"]


@pytest.mark.parametrize("cache, message", [
    ({"medium": "Memory", "persistentVolumeClaim": {"claimName": "c"}}, "medium (of the emptyDir) or persistentVolumeClaim"),
    ({"size": "lots"}, "spec.cache.size"),
    ({"medium": "Disk"}, "spec.cache.medium"),
])
def test_a_bad_cache_setting_is_one_line_naming_it(make_job, cache, message):
    job = make_job(cache=cache)
    with pytest.raises(JobSpecError) as err:
        validate_job(job["metadata"]["name"], job["spec"], Policy())
    assert message in str(err.value) and "\n" not in str(err.value)
