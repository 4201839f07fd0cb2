"""Issue 30 item 2 end to end on the local control plane (its pod runner runs the pods as real
processes): a 2-node gang trains, is suspended mid-run (SIGTERM: a checkpoint), resized to 1 node in
the same patch that unsuspends it, resumes at world size 1 with the run's global batch kept (per-rank
batch x gradient accumulation) and Succeeds; a resize of the running job is refused by the API server."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import events_of
from test_cluster import _job, _wait_for_phase, _worker_pods


@pytest.fixture(scope="module")
def ready(cluster, operator_release, s3_store, dataset):
    return cluster


def _patch(cluster, name: str, spec: dict, check: bool = True):
    return cluster.kubectl("patch", "ddj", name, "--type=merge", "-p", json.dumps({"spec": spec}), check=check)


def test_two_nodes_suspended_resized_to_one_resume_and_succeed(ready):
    cluster, name = ready, "e2e-resize"
    job = cluster.training_job(name, num_epochs=3)  # 2 nodes x 1 process, batch_size 2: global batch 4
    job["spec"]["env"].append({"name": "DDETR_MSDA_IMPL", "value": "reference"})
    cluster.apply([job])

    def training():
        status = _job(cluster, name).get("status") or {}
        assert status.get("phase") not in ("Failed", "Succeeded"), status
        return status.get("phase") == "Running" and (status.get("progress") or {}).get("step", 0) >= 1 and status
    running = cluster.wait_until("the first steps", training, 1200, every=2)
    assert running["worldSize"] == 2
    assert running["batchPlan"] == {"globalBatch": 4, "perRankBatch": 2, "gradientAccumulation": 1}

    refused = _patch(cluster, name, {"nodes": 1}, check=False)  # the running gang cannot change size
    assert isinstance(refused, subprocess.CompletedProcess) and refused.returncode != 0
    assert "spec.nodes and spec.gpusPerNode may change only while the job is suspended" in refused.stderr

    _patch(cluster, name, {"runPolicy": {"suspend": True}})
    _wait_for_phase(cluster, name, "Suspended", timeout=300)
    cluster.wait_until("the gang's pods to stop", lambda: not any(
        (p.get("status") or {}).get("phase") in ("Pending", "Running") for p in _worker_pods(cluster, name)), 300)
    _patch(cluster, name, {"nodes": 1, "runPolicy": {"suspend": False}})

    done = _wait_for_phase(cluster, name, "Succeeded")["status"]
    assert done["worldSize"] == 1 and done["lastResize"]["fromWorldSize"] == 2
    assert done["lastResize"]["toWorldSize"] == 1
    assert done["batchPlan"] == {"globalBatch": 4, "perRankBatch": 2, "gradientAccumulation": 2}
    resized = [e for e in events_of(cluster, name) if e["reason"] == "Resized"]
    assert resized and "world size 2 -> 1" in resized[0]["message"]
    attempt = int(done["workerJob"].rpartition("-a")[2])
    assert attempt >= 1 and len(_worker_pods(cluster, name, attempt=attempt)) == 1
    (rank0,) = _worker_pods(cluster, name, attempt=attempt, index=0)
    log = cluster.pod_log(rank0)
    assert "resuming at world size 1 (the checkpoint's: 2): global batch 4 = 1 process(es) x per-rank batch 2 x " \
           "gradient accumulation 2" in log, log[-3000:]
    assert done["progress"]["epoch"] == done["progress"]["numEpochs"]
