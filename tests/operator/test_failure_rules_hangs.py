"""runPolicy.progressDeadlineSeconds: all pods running and rank 0's heartbeat standing still for that
long -> a retryable failure Hung naming the last step and when, counted in status.hangs, the attempt
stopped and restarted (or decided by a failure rule on class Hung)."""
from __future__ import annotations

import datetime as dt

import pytest

from ddetr_operator import api
from ddetr_operator.decide import DeleteWorkerJob, Observed, reconcile
from operator_objects import pod, worker_job
from test_crd import _example, crdcheck  # noqa: F401 - the API server's CRD checker fixture

from conftest import NOW

CHILDREN = dict(service=True, configmap=True)
LIMIT = 300


def _running_job(make_job, **run_policy):
    """A job whose attempt 0 went all running at NOW - 10 s, rank 0 at step 40 since NOW; with the
    heartbeat the operator's memory holds after that pass."""
    policy = {"progressDeadlineSeconds": LIMIT, **run_policy}
    start = NOW - dt.timedelta(seconds=10)
    job = make_job(status=reconcile(make_job(runPolicy=policy), Observed(), start).status, runPolicy=policy)
    running = Observed(worker_jobs=[worker_job("demo", 0)], pods=_pods(), progress=_progress(39), **CHILDREN)
    first = reconcile(job, running, start)
    job = make_job(status=first.status, runPolicy=policy)
    decision = _at(job, 0, step=40, beat=first.heartbeat)
    assert decision.status["phase"] == "Running"
    return make_job(status=decision.status, runPolicy=policy), decision.heartbeat


def _pods():
    return [pod("demo", 0, 0, "Running"), pod("demo", 0, 1, "Running")]


def _progress(step: int) -> dict:
    return {"num_epochs": 3, "epoch": 0, "step": step, "state": "running"}


def _at(job, seconds: float, step: int = 40, beat=None):
    """A pass `seconds` after NOW seeing rank 0 at `step`, with the operator's heartbeat memory `beat`."""
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=_pods(), progress=_progress(step), heartbeat=beat,
                        **CHILDREN)
    return reconcile(job, observed, NOW + dt.timedelta(seconds=seconds))


def test_a_standing_heartbeat_past_the_deadline_is_hung_retried_and_counted(make_job):
    job, beat = _running_job(make_job)
    assert _at(job, LIMIT - 1, beat=beat).status["phase"] == "Running"
    decision = _at(job, LIMIT + 5, beat=beat)
    status = decision.status
    assert status["phase"] == "Restarting" and status["hangs"] == 1 and status["restarts"] == 1
    assert DeleteWorkerJob("demo-a0") in decision.actions  # its pods would never exit on their own
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == "Hung"
    assert "has not advanced for 305 s" in restarting["message"]
    assert "last step 40 seen at 2026-01-02T03:04:05Z" in restarting["message"]
    last = status["lastFailure"]
    assert (last["failureClass"], last["step"], last["rank"], last["rule"]) == ("Hung", 40, 0, "builtin:retryable")
    assert any(e.reason == "Hung" and e.type == "Warning" for e in decision.events)


def test_a_moving_heartbeat_is_never_hung(make_job):
    job, beat = _running_job(make_job)
    for seconds in range(60, 3 * LIMIT, 60):
        decision = _at(job, seconds, step=40 + seconds, beat=beat)
        assert decision.status["phase"] == "Running", seconds
        job, beat = make_job(status=decision.status, runPolicy=job["spec"]["runPolicy"]), decision.heartbeat
    assert not decision.status.get("hangs")


def test_an_attempt_is_judged_from_its_own_first_heartbeat(make_job):
    job, beat = _running_job(make_job)
    policy = job["spec"]["runPolicy"]
    restarted = _at(job, LIMIT + 5, beat=beat)
    job, beat = make_job(status=restarted.status, runPolicy=policy), restarted.heartbeat
    later = NOW + dt.timedelta(seconds=LIMIT + 60)
    pods1 = [pod("demo", 1, 0, "Running"), pod("demo", 1, 1, "Running")]

    def at(when, step):
        observed = Observed(worker_jobs=[worker_job("demo", 1)], pods=pods1, progress=_progress(step), heartbeat=beat,
                            **CHILDREN)
        return reconcile(job, observed, when)
    decision = at(later, 40)
    assert decision.status["phase"] == "Running"
    job, beat = make_job(status=decision.status, runPolicy=policy), decision.heartbeat
    # Start-up (imports, model build, the resume) shows the old step for long: not judged.
    decision = at(later + dt.timedelta(seconds=3 * LIMIT), 40)
    assert decision.status["phase"] == "Running" and decision.status["hangs"] == 1
    job, beat = make_job(status=decision.status, runPolicy=policy), decision.heartbeat
    first = later + dt.timedelta(seconds=3 * LIMIT + 10)
    armed = at(first, 41)  # its first step: armed
    job, beat = make_job(status=armed.status, runPolicy=policy), armed.heartbeat
    decision = at(first + dt.timedelta(seconds=LIMIT + 1), 41)
    assert decision.status["phase"] == "Restarting" and decision.status["hangs"] == 2
    assert "last step 41 seen at" in decision.status["lastFailure"]["message"]


def test_a_rule_on_class_hung_decides(make_job):
    rules = {"rules": [{"name": "hang-fails", "action": "FailJob", "failureClasses": ["Hung"]}]}
    job, beat = _running_job(make_job, failurePolicy=rules)
    decision = _at(job, LIMIT + 5, beat=beat)
    assert decision.status["phase"] == "Failed" and decision.status["lastFailure"]["rule"] == "hang-fails"
    assert DeleteWorkerJob("demo-a0") in decision.actions


def test_without_the_deadline_a_standing_heartbeat_runs_on(make_job):
    job = make_job(status=reconcile(make_job(), Observed(), NOW).status)
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=_pods(), progress=_progress(40), **CHILDREN)
    job = make_job(status=reconcile(job, observed, NOW).status)
    assert reconcile(job, observed, NOW + dt.timedelta(days=3)).status["phase"] == "Running"


def test_the_deadline_needs_artifacts_where_the_heartbeat_is():
    spec = {"image": "t:1", "experiment": {}, "runPolicy": {"progressDeadlineSeconds": 600}}
    with pytest.raises(api.JobSpecError, match="progressDeadlineSeconds needs artifacts"):
        api.parse(api.JobSpec, spec, "spec")


def test_the_api_server_refuses_the_deadline_without_artifacts(crdcheck):  # noqa: F811 - the fixture
    job = _example(spec__runPolicy={"progressDeadlineSeconds": 600}, spec__artifacts=None)
    result = crdcheck([{"name": "no artifacts", "old": None, "new": job}])
    assert result["crdErrors"] == []
    assert any("progressDeadlineSeconds needs artifacts" in e for e in result["cases"]["no artifacts"])
