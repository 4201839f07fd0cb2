"""Issue 16's behaviours as pure decisions: failed attempts keep their logs, disruptions are not
counted, restarts never overlap and never reuse a name, failures a user can read, start-up
deadlines, Kueue admission, the pod template override and the gang NetworkPolicy."""
from __future__ import annotations

import datetime as dt

import pytest

from ddetr_operator import render
from ddetr_operator.api import resolve
from ddetr_operator.decide import (KEEP_FAILED_ATTEMPTS, Create, DeleteWorkerJob, Observed, SetSuspend, reconcile)
from ddetr_operator.validate import JobSpecError, validate_job
from operator_objects import pod, worker_job

from conftest import NOW

CHILDREN = dict(service=True, configmap=True)
LATER = NOW + dt.timedelta(seconds=30)


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def running_status(**extra) -> dict:
    return {"phase": "Running", "restarts": 0, "conditions": [], "startTime": "2026-01-02T03:00:00Z", **extra}


def disrupted(index: int, attempt: int = 0) -> dict:
    gone = pod("demo", attempt, index, "Failed", 143)
    gone["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                     "message": "Preempted in order to admit critical pod"}]
    return gone


def test_a_disruption_restarts_without_using_the_backoff_limit(make_job):
    job = make_job(status=running_status(), runPolicy={"backoffLimit": 0})
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running"), disrupted(1)],
                        **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert decision.status["phase"] == "Restarting"
    assert decision.status["restarts"] == 0 and decision.status["disruptions"] == 1
    assert decision.status["attempt"] == 1 and decision.status["workerJob"] == "demo-a1"
    assert condition(decision.status, "Restarting")["reason"] == "PreemptionByScheduler"
    assert decision.status["attempts"][-1]["outcome"] == "Disrupted"
    # A real failure after it still meets backoffLimit 0.
    job = make_job(status=decision.status, runPolicy={"backoffLimit": 0})
    observed = Observed(worker_jobs=[worker_job("demo", 1)], pods=[pod("demo", 1, 0, "Failed", 137)], **CHILDREN)
    assert reconcile(job, observed, NOW).status["phase"] == "Failed"


def test_a_terminal_failure_keeps_the_failed_attempts_job_and_pods(make_job):
    job = make_job(status=running_status(restarts=3, attempt=3), runPolicy={"backoffLimit": 3})
    observed = Observed(worker_jobs=[worker_job("demo", 3)], pods=[pod("demo", 3, 1, "Failed", 200)], **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert decision.status["phase"] == "Failed" and decision.actions == []
    # Finished: cleanPodPolicy applies now, and only now.
    done = make_job(status=decision.status)
    assert reconcile(done, observed, LATER).actions == []
    every = make_job(status=decision.status, runPolicy={"cleanPodPolicy": "All"})
    assert reconcile(every, observed, LATER).actions == [DeleteWorkerJob("demo-a3")]


def test_only_the_last_failed_attempts_jobs_are_kept(make_job):
    attempt = KEEP_FAILED_ATTEMPTS + 2  # attempts 0..4 failed; 5 is about to start
    failed = [worker_job("demo", n, "Failed") for n in range(attempt)]
    job = make_job(status={"phase": "Restarting", "restarts": attempt, "attempt": attempt, "conditions": []},
                   runPolicy={"backoffLimit": 10})
    decision = reconcile(job, Observed(worker_jobs=failed, **CHILDREN), NOW)
    deleted = [a.name for a in decision.actions if isinstance(a, DeleteWorkerJob)]
    assert deleted == ["demo-a0", "demo-a1"]
    assert [a.manifest["metadata"]["name"] for a in decision.actions if isinstance(a, Create)] == ["demo-a5"]


def test_the_attempt_number_never_goes_below_the_highest_label_seen(make_job):
    """A status that lost its last write (operator crash) cannot make a pass reuse a Job name."""
    job = make_job(status=running_status(restarts=0))
    observed = Observed(worker_jobs=[worker_job("demo", 0, "Failed"), worker_job("demo", 1)],
                        pods=[pod("demo", 1, 0, "Running"), pod("demo", 1, 1, "Running")], **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert decision.status["attempt"] == 1 and decision.status["workerJob"] == "demo-a1"
    assert not [a for a in decision.actions if isinstance(a, Create)]


def test_an_earlier_attempt_that_did_not_fail_is_stopped_once_the_next_is_recorded(make_job):
    job = make_job(status=running_status(attempt=1, phase="Restarting"))
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running")], **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert decision.actions == [DeleteWorkerJob("demo-a0")]  # and no attempt 1 while its pods live


@pytest.mark.parametrize("state, reason", [
    ({"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "trainer:nope"'}},
     "ImagePullBackOff"),
    ({"waiting": {"reason": "ErrImagePull", "message": "manifest unknown"}}, "ErrImagePull"),
    ({"waiting": {"reason": "CreateContainerConfigError",
                  "message": 'couldn\'t find key AWS_ACCESS_KEY_ID in Secret ml/s3-creds'}},
     "CreateContainerConfigError"),
])
def test_containers_that_cannot_start_are_reported_once(make_job, state, reason):
    stuck = pod("demo", 0, 1, "Pending")
    stuck["status"]["containerStatuses"] = [{"name": "trainer", "state": state}]
    job = make_job(status=running_status(phase="Pending"))
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running"), stuck], **CHILDREN)
    decision = reconcile(job, observed, NOW)
    stalled = condition(decision.status, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == reason
    assert stalled["message"].startswith("pod demo-a0-1-x1: " + reason) and state["waiting"]["message"] in stalled["message"]
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", reason)]
    again = reconcile(make_job(status=decision.status), observed, LATER)
    assert again.events == []  # the same blocker: no new event every pass
    fixed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running"),
                                                                 pod("demo", 0, 1, "Running")], **CHILDREN)
    assert condition(reconcile(make_job(status=decision.status), fixed, LATER).status, "Stalled")["status"] == "False"


def test_unschedulable_pods_are_reported(make_job):
    waiting = pod("demo", 0, 0, "Pending")
    waiting["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    decision = reconcile(make_job(status=running_status(phase="Pending")),
                         Observed(worker_jobs=[worker_job("demo", 0)], pods=[waiting], **CHILDREN), NOW)
    stalled = condition(decision.status, "Stalled")
    assert stalled["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in stalled["message"]


def test_pods_the_job_controller_could_not_create_are_reported(make_job):
    event = {"type": "Warning", "reason": "FailedCreate", "lastTimestamp": "2026-01-02T03:04:00Z",
             "message": 'Error creating: pods "demo-a0-0-abc" is forbidden: violates PodSecurity "restricted:latest"'}
    decision = reconcile(make_job(status=running_status(phase="Pending")),
                         Observed(worker_jobs=[worker_job("demo", 0)], worker_events=[event], **CHILDREN), NOW)
    stalled = condition(decision.status, "Stalled")
    assert stalled["reason"] == "FailedCreate"
    assert stalled["message"].startswith("0/2 pod(s) created: Error creating") and "PodSecurity" in stalled["message"]
    assert [e.reason for e in decision.events] == ["FailedCreate"]


def test_startup_deadline_fails_a_gang_that_never_runs_whole(make_job):
    stuck = pod("demo", 0, 1, "Pending")
    stuck["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]
    worker = worker_job("demo", 0)
    worker["metadata"]["creationTimestamp"] = "2026-01-02T03:00:00Z"
    observed = Observed(worker_jobs=[worker], pods=[pod("demo", 0, 0, "Running"), stuck], **CHILDREN)
    job = make_job(status=running_status(phase="Pending"), runPolicy={"startupDeadlineSeconds": 600})
    assert reconcile(job, observed, NOW).status["phase"] == "Pending"
    decision = reconcile(job, observed, NOW + dt.timedelta(minutes=10))
    failed = condition(decision.status, "Failed")
    assert failed["reason"] == "StartupDeadlineExceeded" and "ImagePullBackOff" in failed["message"]
    assert decision.actions == [DeleteWorkerJob("demo-a0")]


def test_with_kueue_the_deadline_counts_from_admission(make_job):
    labels = {"kueue.x-k8s.io/queue-name": "gpu"}
    first = reconcile(make_job(labels=labels, runPolicy={"activeDeadlineSeconds": 60}), Observed(), NOW)
    assert "startTime" not in first.status  # queued: the clock has not started
    job = make_job(status=first.status, labels=labels, runPolicy={"activeDeadlineSeconds": 60})
    queued = Observed(worker_jobs=[worker_job("demo", 0, suspend=True)], **CHILDREN)
    assert reconcile(job, queued, NOW + dt.timedelta(hours=1)).status["phase"] == "Pending"
    admitted = worker_job("demo", 0)
    admitted["status"]["startTime"] = "2026-01-02T04:04:05Z"
    status = reconcile(job, Observed(worker_jobs=[admitted], **CHILDREN), NOW + dt.timedelta(hours=1)).status
    assert status["startTime"] == "2026-01-02T04:04:05Z"
    job = make_job(status=status, labels=labels, runPolicy={"activeDeadlineSeconds": 60})
    late = reconcile(job, Observed(worker_jobs=[admitted], **CHILDREN), NOW + dt.timedelta(hours=1, seconds=61))
    assert condition(late.status, "Failed")["reason"] == "DeadlineExceeded"


def test_with_kueue_suspend_deletes_the_attempt_instead_of_flipping_the_switch(make_job):
    labels = {"kueue.x-k8s.io/queue-name": "gpu"}
    job = make_job(status=running_status(), labels=labels, runPolicy={"suspend": True})
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running")], **CHILDREN)
    decision = reconcile(job, observed, NOW)
    assert not [a for a in decision.actions if isinstance(a, SetSuspend)]
    assert decision.status["phase"] == "Suspended" and decision.status["attempt"] == 1
    assert decision.actions == []  # intent first; the next pass deletes attempt 0
    job = make_job(status=decision.status, labels=labels, runPolicy={"suspend": True})
    assert reconcile(job, observed, LATER).actions == [DeleteWorkerJob("demo-a0")]
    # Resumed: a new attempt, once attempt 0's pods are gone; the restart counters do not move.
    job = make_job(status=decision.status, labels=labels, runPolicy={"suspend": False})
    resumed = reconcile(job, Observed(**CHILDREN), LATER)
    assert [a.manifest["metadata"]["name"] for a in resumed.actions if isinstance(a, Create)] == ["demo-a1"]
    assert resumed.status["restarts"] == 0 and "disruptions" not in resumed.status


def test_worker_job_replaces_pods_only_once_they_are_gone(make_job):
    assert render.render_worker_job(resolve(make_job()), 0)["spec"]["podReplacementPolicy"] == "Failed"


def test_pod_template_adds_what_the_curated_fields_miss(make_job):
    job = make_job(podTemplate={
        "metadata": {"annotations": {"k8s.v1.cni.cncf.io/networks": "roce"}, "labels": {"team": "vision",
                                                                                       "ddetr.dev/role": "x"}},
        "spec": {"hostNetwork": True, "initContainers": [{"name": "warm", "image": "busybox"}]}},
        securityContext={"capabilities": {"add": ["IPC_LOCK"], "drop": ["ALL"]}})
    validate_job("demo", job["spec"])
    manifest = render.render_worker_job(resolve(job), 0)
    template = manifest["spec"]["template"]
    assert template["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "roce"
    assert template["metadata"]["labels"]["team"] == "vision"
    assert template["metadata"]["labels"]["ddetr.dev/role"] == "worker"  # the operator's labels win
    spec = template["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["initContainers"] == [{"name": "warm", "image": "busybox"}]
    assert spec["containers"][0]["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]


@pytest.mark.parametrize("field", ["containers", "volumes", "restartPolicy", "subdomain"])
def test_pod_template_cannot_replace_what_the_operator_owns(make_job, field):
    with pytest.raises(JobSpecError, match=f"spec.podTemplate.spec.{field}: not accepted"):
        validate_job("demo", make_job(podTemplate={"spec": {field: []}})["spec"])


def test_network_policy_lets_the_gang_talk_on_its_ports_only(make_job):
    job = make_job(networkPolicy=True)
    decision = reconcile(job, Observed(), NOW)
    (policy,) = [a.manifest for a in decision.actions if isinstance(a, Create) and a.manifest["kind"] == "NetworkPolicy"]
    gang = {"matchLabels": {"ddetr.dev/job-name": "demo", "ddetr.dev/role": "worker"}}
    assert policy["spec"]["podSelector"] == gang and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": gang}], "ports": [{"protocol": "TCP", "port": 29500}]},
                                         {"ports": [{"protocol": "TCP", "port": 9090}]}]
    assert render.render_network_policy(resolve(make_job())) is None


def test_the_last_restarts_reason_stays_readable_once_the_new_gang_runs(make_job):
    job = make_job(status=running_status(), runPolicy={"backoffLimit": 0})
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running"), disrupted(1)],
                        **CHILDREN)
    restarting = reconcile(job, observed, NOW).status
    running = Observed(worker_jobs=[worker_job("demo", 0, "Failed"), worker_job("demo", 1)],
                       pods=[pod("demo", 1, 0, "Running"), pod("demo", 1, 1, "Running")], **CHILDREN)
    status = reconcile(make_job(status=restarting, runPolicy={"backoffLimit": 0}), running, LATER).status
    assert status["phase"] == "Running"
    restart = condition(status, "Restarting")
    assert restart["status"] == "False" and restart["reason"] == "PreemptionByScheduler"
    assert restart["lastTransitionTime"] == "2026-01-02T03:04:35Z"
