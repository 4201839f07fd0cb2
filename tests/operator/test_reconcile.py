"""The state machine: every phase transition, failures, restarts, deadlines, suspend, TTL."""
from __future__ import annotations

import datetime as dt

import pytest

from ddetr_operator.decide import (Create, DeleteSelf, DeleteWorkerJob, Observed, SetSuspend, first_failure,
                                      is_retryable_exit, reconcile)
from operator_objects import pod, worker_job

from conftest import NOW

CHILDREN = dict(service=True, configmap=True)


def created_kinds(decision) -> list[str]:
    return [a.manifest["kind"] for a in decision.actions if isinstance(a, Create)]


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_new_job_creates_children_and_is_pending(make_job):
    decision = reconcile(make_job(), Observed(), NOW)
    assert created_kinds(decision) == ["Service", "ConfigMap", "Job"]
    worker = decision.actions[-1].manifest
    assert worker["metadata"]["name"] == "demo-a0"
    assert decision.status["phase"] == "Pending"
    assert decision.status["startTime"] == "2026-01-02T03:04:05Z"
    assert decision.status["restarts"] == 0
    assert condition(decision.status, "Created")["reason"] == "GangCreated"
    assert [e.reason for e in decision.events] == ["GangCreated"]


def test_second_pass_creates_nothing_twice(make_job):
    first = reconcile(make_job(), Observed(), NOW)
    job = make_job(status=first.status)
    again = reconcile(job, Observed(worker_jobs=[worker_job("demo", 0)], **CHILDREN), NOW + dt.timedelta(seconds=5))
    assert again.actions == [] and again.events == []
    assert again.status["conditions"] == first.status["conditions"]  # transition times kept


def test_invalid_experiment_fails_before_any_pod_with_the_cli_message(make_job):
    job = make_job(experiment={"model": {"num_feature_levels": 7}})
    decision = reconcile(job, Observed(), NOW)
    assert decision.actions == []
    assert decision.status["phase"] == "Failed"
    failed = condition(decision.status, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"] == "spec.experiment.model.num_feature_levels: 7 is out of range; accepted: 1..4"
    assert decision.status["completionTime"] == "2026-01-02T03:04:05Z"
    assert decision.events[0].type == "Warning"


@pytest.mark.parametrize("spec, field", [
    ({"nodes": 2, "task": "evaluate"}, "spec.nodes"),
    ({"artifacts": None}, "spec.artifacts.uri"),
    ({"gangScheduling": {"scheduler": "volcano", "minAvailable": 3}}, "spec.gangScheduling.minAvailable"),
    ({"experiment": {"train": {"num_epochs": "many"}}}, "spec.experiment.train.num_epochs"),
])
def test_operator_level_rules_name_the_field(make_job, spec, field):
    decision = reconcile(make_job(**spec), Observed(), NOW)
    assert decision.status["phase"] == "Failed"
    assert condition(decision.status, "Failed")["message"].startswith(field)


def test_spec_edited_into_an_invalid_one_stops_the_gang(make_job):
    job = make_job(status={"phase": "Running", "restarts": 0, "conditions": []},
                   experiment={"dataset": {"batch_size": 0}})
    decision = reconcile(job, Observed(worker_jobs=[worker_job("demo", 0)], **CHILDREN), NOW)
    assert decision.status["phase"] == "Failed"
    assert decision.actions == [DeleteWorkerJob("demo-a0")]
    assert condition(decision.status, "Failed")["message"].startswith("spec.experiment.dataset.batch_size")


def test_bad_name_is_rejected(make_job):
    job = make_job()
    job["metadata"]["name"] = "x" * 41
    assert condition(reconcile(job, Observed(), NOW).status, "Failed")["message"].startswith("metadata.name")


def pending(make_job, **spec):
    return make_job(status=reconcile(make_job(**spec), Observed(), NOW).status, **spec)


def test_running_when_every_worker_runs(make_job):
    job = pending(make_job)
    half = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running"), pod("demo", 0, 1, "Pending")],
                    **CHILDREN)
    decision = reconcile(job, half, NOW)
    assert decision.status["phase"] == "Pending" and decision.status["workersReady"] == 1
    full = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running"), pod("demo", 0, 1, "Running")],
                    **CHILDREN)
    decision = reconcile(job, full, NOW)
    assert decision.status["phase"] == "Running" and decision.status["workersReady"] == 2
    assert condition(decision.status, "Running")["status"] == "True"
    assert [e.reason for e in decision.events] == ["AllWorkersRunning"]


def test_progress_from_rank0_status(make_job):
    job = pending(make_job)
    progress = {"epoch": 2, "num_epochs": 3, "step": 40, "last_loss": 1.5, "last_map": 0.25,
                "last_checkpoint": "s3://bucket/runs/demo/train/model_epoch_001.pth", "state": "running"}
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running")], progress=progress,
                        **CHILDREN)
    status = reconcile(job, observed, NOW).status
    assert status["epochs"] == "2/3"
    assert status["progress"] == {"epoch": 2, "numEpochs": 3, "step": 40, "lastLoss": 1.5, "lastMap": 0.25,
                                  "lastCheckpoint": "s3://bucket/runs/demo/train/model_epoch_001.pth",
                                  "state": "running", "updateTime": "2026-01-02T03:04:05Z"}
    # The same progress later: nothing changes, so the status need not be written again.
    later = reconcile(make_job(status=status), observed, NOW + dt.timedelta(seconds=30)).status
    assert later == status
    # A step alone is no patch (the hang heartbeat sees it in the operator's memory); an epoch's end is.
    moved = Observed(**{**observed.__dict__, "progress": {**progress, "step": 41}})
    assert reconcile(make_job(status=status), moved, NOW + dt.timedelta(seconds=30)).status == status
    epoch_end = Observed(**{**observed.__dict__, "progress": {**progress, "epoch": 3, "step": 60}})
    assert reconcile(make_job(status=status), epoch_end, NOW + dt.timedelta(seconds=30)).status["progress"][
        "updateTime"] == "2026-01-02T03:04:35Z"


def test_progress_fields_of_another_type_are_dropped(make_job):
    job = pending(make_job)
    odd = {"epoch": "two", "num_epochs": 3, "step": True, "last_loss": 1.5, "last_map": {"mAP": 0.3},
           "last_checkpoint": 7, "state": "running"}
    observed = Observed(worker_jobs=[worker_job("demo", 0)], progress=odd, **CHILDREN)
    status = reconcile(job, observed, NOW).status
    assert status["progress"] == {"numEpochs": 3, "lastLoss": 1.5, "state": "running",
                                  "updateTime": "2026-01-02T03:04:05Z"}
    assert "epochs" not in status


def test_succeeded_when_the_job_completes(make_job):
    job = pending(make_job)
    observed = Observed(worker_jobs=[worker_job("demo", 0, "Complete")],
                        pods=[pod("demo", 0, 0, "Succeeded", 0), pod("demo", 0, 1, "Succeeded", 0)], **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert decision.status["phase"] == "Succeeded"
    assert decision.status["completionTime"] == "2026-01-02T03:04:05Z"
    assert decision.actions == []  # cleanPodPolicy Running: finished pods stay for debugging


def test_usage_error_exit_2_is_permanent(make_job):
    job = pending(make_job)
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[
        pod("demo", 0, 0, "Failed", 2, message="deformable-detr train: error: dataset.train_data_sources: missing"),
        pod("demo", 0, 1, "Running")], **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert decision.status["phase"] == "Failed"
    assert decision.status["restarts"] == 0
    failed = condition(decision.status, "Failed")
    assert failed["reason"] == "ExitCode2"
    assert "dataset.train_data_sources: missing" in failed["message"]
    # Nothing is deleted: the Job controller stops the rest (backoffLimit 0) and the failed pod keeps its logs.
    assert decision.actions == []
    assert decision.status["lastFailure"] == {
        "attempt": 0, "rank": 0, "pod": "demo-a0-0-x0", "exitCode": 2, "reason": "ExitCode2",
        "message": failed["message"].removeprefix("permanent failure, not retried: "), "time": "2026-01-02T03:04:05Z",
        "rule": "builtin:permanent-exit-code", "action": "FailJob"}
    assert decision.status["attempts"] == [{"attempt": 0, "startTime": "2026-01-02T03:04:05Z",
                                            "finishTime": "2026-01-02T03:04:05Z", "outcome": "Failed",
                                            "reason": "ExitCode2", "rank": 0, "exitCode": 2}]


def test_oom_kill_restarts_the_gang_from_the_next_attempt(make_job):
    job = pending(make_job)
    failed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[
        pod("demo", 0, 0, "Running"), pod("demo", 0, 1, "Failed", 137, reason="OOMKilled")], **CHILDREN)
    decision = reconcile(job, failed, NOW)
    assert decision.status["phase"] == "Restarting"
    assert decision.status["restarts"] == 1
    assert decision.status["workerJob"] == "demo-a1"
    assert decision.status["restartTime"] == "2026-01-02T03:04:05Z"
    assert condition(decision.status, "Restarting")["reason"] == "OOMKilled"
    assert decision.status["attempt"] == 1 and decision.status["lastFailure"]["rank"] == 1
    assert decision.actions == []  # the intent is recorded first; the Job controller stops the rest
    assert decision.events[0].type == "Warning"

    # The old gang still terminating (checkpoint on SIGTERM): wait, never two gangs at once, however
    # long it takes (no fixed cap: the pods' own termination grace bounds it).
    job = make_job(status=decision.status)
    stopping = pod("demo", 0, 0, "Running")
    stopping["metadata"]["deletionTimestamp"] = "2026-01-02T03:04:06Z"
    old_job = worker_job("demo", 0, "Failed", reason="BackoffLimitExceeded")
    terminating = Observed(worker_jobs=[old_job], pods=[stopping, pod("demo", 0, 1, "Failed", 137)], **CHILDREN)
    assert reconcile(job, terminating, NOW).actions == []
    assert reconcile(job, terminating, NOW + dt.timedelta(hours=2)).actions == []

    # Gone: the next attempt starts; its rank 0 is the new master. The failed attempt's Job stays.
    gone = Observed(worker_jobs=[old_job], pods=[pod("demo", 0, 0, "Failed", 143), pod("demo", 0, 1, "Failed", 137)],
                    **CHILDREN)
    decision = reconcile(job, gone, NOW)
    (create,) = decision.actions
    assert create.manifest["metadata"]["name"] == "demo-a1"
    env = {e["name"]: e.get("value") for e in create.manifest["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PET_MASTER_ADDR"] == "demo-a1-0.demo-workers.ml.svc"
    assert decision.status["phase"] == "Restarting"

    running = Observed(worker_jobs=[worker_job("demo", 1)], pods=[pod("demo", 1, 0, "Running"), pod("demo", 1, 1, "Running")],
                       **CHILDREN)
    decision = reconcile(make_job(status=decision.status), running, NOW)
    assert decision.status["phase"] == "Running"
    assert condition(decision.status, "Restarting")["status"] == "False"


def test_backoff_limit_exhausted_fails_with_the_last_log_lines(make_job):
    job = make_job(status={"phase": "Running", "restarts": 2, "conditions": [], "startTime": "2026-01-02T00:00:00Z"},
                   runPolicy={"backoffLimit": 2})
    observed = Observed(worker_jobs=[worker_job("demo", 2)], pods=[
        pod("demo", 2, 0, "Failed", 143, message="SIGTERM: saved checkpoint model_epoch_002.pth")], **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert decision.status["phase"] == "Failed"
    failed = condition(decision.status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "SIGTERM: saved checkpoint model_epoch_002.pth" in failed["message"]
    assert decision.status["restarts"] == 2


def test_the_earliest_failure_decides():
    # Worker 1 was OOM-killed first; worker 0 then failed with exit 1 because its peer vanished.
    pods = [pod("demo", 0, 0, "Failed", 1, finished_at="2026-01-02T03:00:09Z"),
            pod("demo", 0, 1, "Failed", 137, reason="OOMKilled", finished_at="2026-01-02T03:00:01Z")]
    failure = first_failure(pods)
    assert failure.retryable and failure.reason == "OOMKilled"


def test_a_disrupted_peer_makes_exit_1_retryable():
    # Node lost: Kubernetes marks the pod there; its peer's torchrun exits 1 first.
    lost = pod("demo", 0, 1, "Running")
    lost["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                     "reason": "DeletionByTaintManager", "message": "Taint manager: deleting due to NoExecute taint"}]
    failure = first_failure([pod("demo", 0, 0, "Failed", 1), lost])
    assert failure.retryable and failure.reason == "DeletionByTaintManager"
    assert first_failure([lost]) is None  # nothing failed yet


def test_evicted_pod_without_exit_code_is_retryable(make_job):
    job = pending(make_job)
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Failed", pod_reason="Evicted")],
                        **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert decision.status["phase"] == "Restarting"
    assert condition(decision.status, "Restarting")["reason"] == "Evicted"


def test_worker_job_failed_with_its_pods_gone_is_retryable(make_job):
    job = pending(make_job)
    observed = Observed(worker_jobs=[worker_job("demo", 0, "Failed", reason="BackoffLimitExceeded")], **CHILDREN)
    assert reconcile(job, observed, NOW).status["phase"] == "Restarting"


@pytest.mark.parametrize("code, retryable", [(1, False), (2, False), (127, False), (128, True), (137, True),
                                             (143, True), (200, True), (255, True), (-9, True)])
def test_exit_code_policy(code, retryable):
    assert is_retryable_exit(code) is retryable


def test_active_deadline_fails_and_stops_the_gang(make_job):
    job = make_job(status={"phase": "Running", "restarts": 0, "conditions": [], "startTime": "2026-01-02T02:00:00Z"},
                   runPolicy={"activeDeadlineSeconds": 3600})
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running")], **CHILDREN)
    assert reconcile(job, observed, NOW - dt.timedelta(minutes=10)).status["phase"] == "Running"
    decision = reconcile(job, observed, NOW)
    assert decision.status["phase"] == "Failed"
    assert condition(decision.status, "Failed")["reason"] == "DeadlineExceeded"
    assert decision.actions == [DeleteWorkerJob("demo-a0")]


def test_terminating_pods_never_count_as_ready(make_job):
    job = pending(make_job)
    leaving = pod("demo", 0, 1, "Running")
    leaving["metadata"]["deletionTimestamp"] = "2026-01-02T03:04:00Z"
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running"), leaving], **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert decision.status["workersReady"] == 1 and decision.status["phase"] == "Pending"


def test_suspend_and_resume(make_job):
    running = {"phase": "Running", "restarts": 0, "conditions": [], "startTime": "2026-01-02T00:00:00Z"}
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running")], **CHILDREN)
    decision = reconcile(make_job(status=running, runPolicy={"suspend": True}), observed, NOW)
    assert decision.actions == [SetSuspend("demo-a0", True)]
    assert decision.status["phase"] == "Suspended"
    assert condition(decision.status, "Suspended")["status"] == "True"

    # Resumed while the suspended gang's pods still terminate: wait (never two pods of one rank).
    stopping = pod("demo", 0, 0, "Running")
    stopping["metadata"]["deletionTimestamp"] = "2026-01-02T03:04:00Z"
    still = Observed(worker_jobs=[worker_job("demo", 0, suspend=True)], pods=[stopping], **CHILDREN)
    assert reconcile(make_job(status=decision.status, runPolicy={"suspend": False}), still, NOW).actions == []
    suspended = Observed(worker_jobs=[worker_job("demo", 0, suspend=True)], **CHILDREN)
    decision = reconcile(make_job(status=decision.status, runPolicy={"suspend": False}), suspended, NOW)
    assert decision.actions == [SetSuspend("demo-a0", False)]
    assert decision.status["phase"] == "Pending"
    assert condition(decision.status, "Suspended")["status"] == "False"
    assert decision.status["startTime"] == "2026-01-02T03:04:05Z"  # deadline counts from the resume


def test_suspended_before_start_creates_no_gang(make_job):
    decision = reconcile(make_job(runPolicy={"suspend": True}), Observed(), NOW)
    assert created_kinds(decision) == ["Service", "ConfigMap"]
    assert decision.status["phase"] == "Suspended"
    job = make_job(status=decision.status, runPolicy={"suspend": False})
    decision = reconcile(job, Observed(**CHILDREN), NOW)
    assert created_kinds(decision) == ["Job"]
    assert condition(decision.status, "Created")["reason"] == "Resumed"


def test_kueue_queue_label_leaves_admission_to_kueue(make_job):
    labels = {"kueue.x-k8s.io/queue-name": "gpu"}
    decision = reconcile(make_job(labels=labels), Observed(), NOW)
    worker = decision.actions[-1].manifest
    assert worker["spec"]["suspend"] is True
    assert worker["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    job = make_job(status=decision.status, labels=labels)
    decision = reconcile(job, Observed(worker_jobs=[worker_job("demo", 0, suspend=True)], **CHILDREN), NOW)
    assert decision.actions == []
    assert condition(decision.status, "Created")["reason"] == "Queued"


def test_ttl_after_finished_deletes_the_job(make_job):
    done = {"phase": "Succeeded", "restarts": 0, "conditions": [], "completionTime": "2026-01-02T03:00:00Z"}
    job = make_job(status=done, runPolicy={"ttlSecondsAfterFinished": 600})
    assert reconcile(job, Observed(**CHILDREN), NOW).actions == []
    assert reconcile(job, Observed(**CHILDREN), NOW + dt.timedelta(minutes=10)).actions == [DeleteSelf()]


def test_clean_pod_policy_all_deletes_the_finished_gang(make_job):
    done = {"phase": "Failed", "restarts": 0, "conditions": [], "completionTime": "2026-01-02T03:00:00Z"}
    observed = Observed(worker_jobs=[worker_job("demo", 0, "Failed")], **CHILDREN)
    assert reconcile(make_job(status=done), observed, NOW).actions == []
    job = make_job(status=done, runPolicy={"cleanPodPolicy": "All"})
    assert reconcile(job, observed, NOW).actions == [DeleteWorkerJob("demo-a0")]


def test_gang_scheduling_creates_a_podgroup(make_job):
    decision = reconcile(make_job(gangScheduling={"scheduler": "volcano"}), Observed(), NOW)
    assert created_kinds(decision) == ["Service", "ConfigMap", "PodGroup", "Job"]
