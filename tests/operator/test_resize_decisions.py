"""A job resized while suspended (spec.nodes, spec.gpusPerNode): the operator's decisions, as pure functions.

The base job runs 2 nodes x 4 GPUs = 8 processes with dataset.batch_size 4 (the default): global batch 32.
"""
from __future__ import annotations

from ddetr_operator.decide import Create, DeleteWorkerJob, Observed, SetSuspend, reconcile
from operator_objects import worker_job
from conftest import NOW

CHILDREN = dict(service=True, configmap=True)


def _workers(decision) -> list[dict]:
    return [a.manifest for a in decision.actions if isinstance(a, Create) and a.manifest["kind"] == "Job"]


def _suspended_at_eight(make_job, labels=None) -> dict:
    """The status of a job that ran attempt 0 on 8 processes and was then suspended."""
    first = reconcile(make_job(labels=labels), Observed(), NOW)
    assert first.status["worldSize"] == 8 and "lastResize" not in first.status
    assert first.status["batchPlan"] == {"globalBatch": 32, "perRankBatch": 4, "gradientAccumulation": 1}
    observed = Observed(worker_jobs=[worker_job("demo", 0, suspend=bool(labels))], **CHILDREN)
    suspended = reconcile(make_job(status=first.status, labels=labels, runPolicy={"suspend": True}), observed, NOW)
    assert suspended.status["phase"] == "Suspended"
    return suspended.status


def test_unsuspending_at_another_size_starts_the_next_attempt_with_the_global_batch_kept(make_job):
    status = _suspended_at_eight(make_job)
    job = make_job(status=status, nodes=1, runPolicy={"suspend": False})
    # The suspended Job keeps its gang's size: it is not resumed, the next attempt is recorded instead.
    decision = reconcile(job, Observed(worker_jobs=[worker_job("demo", 0, suspend=True)], **CHILDREN), NOW)
    assert not any(isinstance(a, SetSuspend) for a in decision.actions)
    assert (decision.status["attempt"], decision.status["workerJob"]) == (1, "demo-a1")
    # The next pass deletes the old Job and creates the resized one.
    job = make_job(status=decision.status, nodes=1, runPolicy={"suspend": False})
    decision = reconcile(job, Observed(worker_jobs=[worker_job("demo", 0, suspend=True)], **CHILDREN), NOW)
    assert DeleteWorkerJob("demo-a0") in decision.actions
    (worker,) = _workers(decision)
    assert worker["metadata"]["name"] == "demo-a1" and worker["spec"]["parallelism"] == 1
    assert decision.status["worldSize"] == 4
    assert decision.status["batchPlan"] == {"globalBatch": 32, "perRankBatch": 4, "gradientAccumulation": 2}
    assert decision.status["lastResize"] == {"fromWorldSize": 8, "toWorldSize": 4, "time": "2026-01-02T03:04:05Z"}
    resized = next(e for e in decision.events if e.reason == "Resized")
    assert resized.type == "Normal" and resized.message == (
        "world size 8 -> 4 (spec.nodes 1, gpusPerNode 4), resuming from the newest checkpoint: global batch 32 = "
        "4 process(es) x per-rank batch 4 x gradient accumulation 2")
    assert decision.status["phase"] == "Pending"


def test_a_bigger_gang_takes_smaller_per_rank_batches(make_job):
    status = _suspended_at_eight(make_job)
    job = make_job(status={**status, "attempt": 1}, nodes=4, runPolicy={"suspend": False})
    decision = reconcile(job, Observed(**CHILDREN), NOW)
    assert _workers(decision)[0]["spec"]["parallelism"] == 4
    assert decision.status["batchPlan"] == {"globalBatch": 32, "perRankBatch": 2, "gradientAccumulation": 1}


def test_a_size_that_cannot_share_the_global_batch_starts_nothing(make_job):
    status = _suspended_at_eight(make_job)
    job = make_job(status={**status, "attempt": 1}, nodes=3, runPolicy={"suspend": False})  # 12 processes
    decision = reconcile(job, Observed(**CHILDREN), NOW)
    assert _workers(decision) == []
    assert decision.status["phase"] == "Pending" and decision.status["worldSize"] == 8
    (event,) = [e for e in decision.events if e.reason == "ResizeRefused"]
    assert event.message.startswith("spec.nodes x spec.gpusPerNode = 12: the run's global batch is 32 images per "
                                    "step, which 12 process(es) cannot share evenly; accepted world sizes")
    # Set back to a size that fits (after suspending again), the job resumes.
    job = make_job(status=decision.status, nodes=2, runPolicy={"suspend": False})
    assert [w["spec"]["parallelism"] for w in _workers(reconcile(job, Observed(**CHILDREN), NOW))] == [2]


def test_a_kueue_job_resized_while_suspended_is_queued_again_at_its_new_size(make_job):
    labels = {"kueue.x-k8s.io/queue-name": "gpu"}
    status = _suspended_at_eight(make_job, labels)
    assert status["attempt"] == 1  # Kueue's suspend deleted attempt 0
    job = make_job(status=status, labels=labels, gpusPerNode=1, runPolicy={"suspend": False})
    decision = reconcile(job, Observed(**CHILDREN), NOW)
    (worker,) = _workers(decision)
    assert worker["spec"]["suspend"] is True and worker["spec"]["parallelism"] == 2  # Kueue admits it whole
    assert decision.status["batchPlan"] == {"globalBatch": 32, "perRankBatch": 4, "gradientAccumulation": 4}
    assert [e.reason for e in decision.events if e.reason == "Resized"] == ["Resized"]


def test_a_restart_at_the_same_size_is_no_resize(make_job):
    status = _suspended_at_eight(make_job)
    job = make_job(status=status, runPolicy={"suspend": False})
    decision = reconcile(job, Observed(worker_jobs=[worker_job("demo", 0, suspend=True)], **CHILDREN), NOW)
    assert decision.actions == [SetSuspend("demo-a0", False)]
    assert "lastResize" not in decision.status and not any(e.reason == "Resized" for e in decision.events)
