"""End to end, on the local control plane (its pod runner runs the pods as real processes)
or on the cluster KUBECONFIG names: the chart installs the operator; a tiny CPU
DeformableDetrJob on 2 nodes trains to Succeeded with progress in its status and columns,
checkpoints in S3 and live metrics; a second job survives the loss of a worker (its rank's
process SIGKILLed, or its pod force-deleted) by restarting its gang from the newest
checkpoint."""
from __future__ import annotations

import json

import pytest

import e2e_manifests as m

JOB_TIMEOUT_S = 1500
LABEL_JOB, LABEL_ATTEMPT = "ddetr.dev/job-name", "ddetr.dev/attempt"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def _job(cluster, name: str) -> dict:
    return cluster.get("deformabledetrjobs", name)


def _phase(cluster, name: str) -> str | None:
    return (_job(cluster, name).get("status") or {}).get("phase")


def _wait_for_phase(cluster, name: str, wanted: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    def reached():
        job = _job(cluster, name)
        phase = (job.get("status") or {}).get("phase")
        if phase == "Failed" and wanted != "Failed":
            raise AssertionError(f"{name} failed: {json.dumps(job['status'].get('conditions'), indent=1)}")
        return job if phase == wanted else None
    return cluster.wait_until(f"{name} to reach {wanted}", reached, timeout)


def _worker_pods(cluster, name: str, attempt: int | None = None, index: int | None = None) -> list[dict]:
    selector = f"{LABEL_JOB}={name}"
    if attempt is not None:
        selector += f",{LABEL_ATTEMPT}={attempt}"
    pods = json.loads(cluster.kubectl("get", "pods", "-l", selector, "-o", "json"))["items"]
    if index is not None:
        pods = [p for p in pods if p["metadata"]["annotations"].get(INDEX_LABEL) == str(index)]
    return pods


def _s3_keys(cluster, prefix: str, helper_name: str) -> list[str]:
    return json.loads(cluster.run_python(helper_name, m.list_objects_code(prefix)).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ready(cluster, operator_release, s3_store, dataset):
    return cluster


def test_two_node_job_trains_to_succeeded(ready):
    cluster, name = ready, "e2e-train"
    cluster.apply([cluster.training_job(name, num_epochs=3)])

    # Rank 0 serves /metrics while it trains: scrape it through a port-forward.
    def trainer_metrics():
        if _phase(cluster, name) in ("Succeeded", "Failed"):
            raise AssertionError("the job finished before its metrics endpoint could be scraped")
        pods = [p for p in _worker_pods(cluster, name, index=0) if p["status"].get("phase") == "Running"]
        if not pods:
            return None
        try:
            text = cluster.scrape_pod(pods[0], 9090)
        except (AssertionError, OSError):
            return None
        return text if f'ddetr_train_step{{job="{name}"}}' in text else None
    metrics = cluster.wait_until("rank 0's /metrics", trainer_metrics, JOB_TIMEOUT_S, every=2)
    assert f'ddetr_train_loss{{job="{name}",term="total"}}' in metrics

    job = _wait_for_phase(cluster, name, "Succeeded")
    status = job["status"]
    assert status["restarts"] == 0
    assert status["startTime"] and status["completionTime"]
    progress = status["progress"]
    assert progress["numEpochs"] == 3 and progress["epoch"] >= progress["numEpochs"] - 1 and progress["step"] > 0
    assert progress["lastCheckpoint"].startswith(f"s3://{m.BUCKET}/{name}/train/")
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in status["conditions"])
    assert len(_worker_pods(cluster, name)) == 2
    # Epoch, loss and mAP in status, and the same figures in `kubectl get ddj`'s columns.
    assert isinstance(progress["lastLoss"], (int, float)) and isinstance(progress["lastMap"], (int, float))
    header, row = cluster.kubectl("get", "ddj", name).splitlines()[:2]
    columns = dict(zip(header.split(), row.split()))
    assert columns["PHASE"] == "Succeeded" and columns["EPOCH"] == status["epochs"]
    assert float(columns["LOSS"]) == pytest.approx(progress["lastLoss"], rel=1e-3)
    assert float(columns["MAP"]) == pytest.approx(progress["lastMap"], rel=1e-3, abs=1e-6)

    keys = _s3_keys(cluster, f"{name}/train/", "list-e2e-train")
    assert any(k.endswith(".pth") for k in keys) and f"{name}/train/status.json" in keys
    assert progress["lastCheckpoint"].removeprefix(f"s3://{m.BUCKET}/") in keys

    operator_metrics = cluster.scrape_operator()
    succeeded = [line for line in operator_metrics.splitlines()
                 if line.startswith('ddetr_operator_jobs{phase="Succeeded"}')]
    assert succeeded and float(succeeded[0].split()[-1]) >= 1


def test_killed_worker_restarts_the_gang_from_its_checkpoint(ready):
    cluster, name = ready, "e2e-restart"
    cluster.apply([cluster.training_job(name, num_epochs=8)])

    def first_checkpoint():
        job = _job(cluster, name)
        status = job.get("status") or {}
        if status.get("phase") in ("Failed", "Succeeded"):
            raise AssertionError(f"{name} ended ({status['phase']}) before its first checkpoint: "
                                 f"{json.dumps(status.get('conditions'), indent=1)[-3000:]}")
        return status.get("phase") == "Running" and (status.get("progress") or {}).get("lastCheckpoint")
    checkpoint = cluster.wait_until("the first checkpoint", first_checkpoint, JOB_TIMEOUT_S, every=2)

    (victim,) = _worker_pods(cluster, name, attempt=0, index=1)
    cluster.break_worker(victim)  # SIGKILL of its rank's process (local) or a force-deleted pod

    cluster.wait_until("a gang restart", lambda: (_job(cluster, name).get("status") or {}).get("restarts", 0) >= 1,
                       600)
    job = _wait_for_phase(cluster, name, "Succeeded")
    # Exactly one restart where the test breaks a worker itself; elsewhere a preemption may add more.
    assert job["status"]["restarts"] == 1 if cluster.local else job["status"]["restarts"] >= 1
    progress = job["status"]["progress"]
    assert progress["numEpochs"] == 8 and progress["epoch"] >= progress["numEpochs"] - 1

    # The new attempt's rank 0 resumed from a checkpoint instead of starting over.
    attempt = int(job["status"]["workerJob"].rpartition("-a")[2])
    assert attempt >= 1
    (rank0,) = _worker_pods(cluster, name, attempt=attempt, index=0)
    log = cluster.pod_log(rank0)
    assert "resuming from" in log, log[-2000:]
    assert checkpoint.startswith(f"s3://{m.BUCKET}/{name}/train/")
    assert any(k.endswith(".pth") for k in _s3_keys(cluster, f"{name}/train/", "list-e2e-restart"))

    # The operator counted the restart in its own metrics.
    text = cluster.scrape_operator()
    restarts = [line for line in text.splitlines()
                if line.startswith(f'ddetr_operator_job_restarts_total{{namespace="{cluster.namespace}"}}')]
    assert restarts and float(restarts[0].split()[-1]) >= 1
