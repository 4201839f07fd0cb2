"""The API server refusing a child: never a silent Pending (status condition + Warning event with its message)."""
from __future__ import annotations

import datetime as dt
import json

import pytest
from kubernetes.client.exceptions import ApiException

from ddetr_operator import passes as operator_passes
from ddetr_operator.controller import Controller
from ddetr_operator.kube import Cluster, child_error
from ddetr_operator.decide import (ChildError, Create, DeleteWorkerJob, Observed, SetSuspend, reconcile, settle,
                                      wants_pass)

from conftest import NOW
from operator_objects import idle_cluster

INVALID_TOLERATION = ('Job.batch "demo-a0" is invalid: spec.template.spec.tolerations[0].operator: Invalid value: '
                      '"Sometimes": a valid toleration operator must be \'Exists\' or \'Equal\'')
FORBIDDEN = ('jobs.batch "demo-a0" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=8, '
             'used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8')
NO_PODGROUP_KIND = "the server could not find the requested resource"


def api_error(code: int, reason: str, message: str) -> ApiException:
    err = ApiException(status=code, reason={403: "Forbidden", 404: "Not Found", 409: "Conflict",
                                            422: "Unprocessable Entity", 500: "Internal Server Error"}[code])
    err.body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                           "reason": reason, "code": code}).encode()
    return err


class RefusingApi:
    """Stands in for the client's CoreV1Api / BatchV1Api / CustomObjectsApi: every call raises `error`."""

    def __init__(self, error: ApiException | None):
        self.error, self.calls = error, []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            if self.error is not None:
                raise self.error
        return call


def cluster_refusing(error: ApiException | None) -> Cluster:
    cluster = Cluster(api_client=None)  # the real state, then the refusing APIs
    cluster.core = cluster.batch = cluster.custom = RefusingApi(error)
    return cluster


def new_job_decision(make_job, **spec):
    job = make_job(**spec)
    return job, reconcile(job, Observed(), NOW)


def test_invalid_child_fails_the_job_with_the_api_servers_message(make_job):
    job, decision = new_job_decision(make_job)
    worker = decision.actions[-1]
    error = cluster_refusing(api_error(422, "Invalid", INVALID_TOLERATION)).apply(job, worker, Observed())
    assert error == ChildError("create Job demo-a0", 422, "Invalid", INVALID_TOLERATION) and error.permanent
    settled = settle(job, decision, error, NOW)
    assert settled.status["phase"] == "Failed" and settled.actions == []
    failed = next(c for c in settled.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ChildRejected"
    assert failed["message"] == f"create Job demo-a0 was refused by the API server (422 Invalid): {INVALID_TOLERATION}"
    assert "workerJob" not in settled.status  # the decided "GangCreated" did not happen
    (event,) = settled.events
    assert (event.type, event.reason) == ("Warning", "ChildRejected") and INVALID_TOLERATION in event.message


def test_missing_podgroup_crd_is_permanent(make_job):
    job, decision = new_job_decision(make_job, gangScheduling={"scheduler": "volcano"})
    podgroup = next(a for a in decision.actions if isinstance(a, Create) and a.manifest["kind"] == "PodGroup")
    error = cluster_refusing(api_error(404, "NotFound", NO_PODGROUP_KIND)).apply(job, podgroup, Observed())
    assert error.what == "create PodGroup demo (scheduling.volcano.sh/v1beta1)" and error.permanent
    settled = settle(job, decision, error, NOW)
    assert settled.status["phase"] == "Failed" and NO_PODGROUP_KIND in settled.status["conditions"][-1]["message"]


def test_forbidden_is_retried_with_a_condition_and_one_event_per_message(make_job):
    job, decision = new_job_decision(make_job)
    error = cluster_refusing(api_error(403, "Forbidden", FORBIDDEN)).apply(job, decision.actions[-1], Observed())
    assert error.code == 403 and not error.permanent
    first = settle(job, decision, error, NOW)
    assert first.status["phase"] == "Pending"
    condition = next(c for c in first.status["conditions"] if c["type"] == "ChildCreateFailed")
    assert condition["status"] == "True" and condition["reason"] == "Forbidden" and FORBIDDEN in condition["message"]
    assert [(e.type, e.reason) for e in first.events] == [("Warning", "ChildCreateFailed")]

    # The next pass meets the same refusal: same condition, no second event.
    job = make_job(status=first.status)
    again = settle(job, reconcile(job, Observed(), NOW), error, NOW + dt.timedelta(seconds=10))
    assert again.events == [] and again.status["conditions"] == first.status["conditions"]

    # The quota frees up: the gang is created and the condition turns False.
    later = NOW + dt.timedelta(seconds=20)
    done = settle(job, reconcile(job, Observed(), later), None, later)
    assert done.status["phase"] == "Pending" and [e.reason for e in done.events] == ["GangCreated"]
    condition = next(c for c in done.status["conditions"] if c["type"] == "ChildCreateFailed")
    assert condition["status"] == "False"


@pytest.mark.parametrize("code, reason, permanent", [
    (400, "BadRequest", True), (422, "Invalid", True), (404, "NotFound", True), (401, "Unauthorized", False),
    (403, "Forbidden", False), (409, "Conflict", False), (429, "TooManyRequests", False),
    (500, "InternalError", False), (503, "ServiceUnavailable", False)])
def test_which_refusals_are_permanent(code, reason, permanent):
    assert ChildError("create Job demo-a0", code, reason, "m").permanent is permanent


def test_already_exists_and_already_gone_count_as_done(make_job):
    job, decision = new_job_decision(make_job)
    assert cluster_refusing(api_error(409, "AlreadyExists", "exists")).apply(job, decision.actions[0], Observed()) is None
    gone = cluster_refusing(api_error(404, "NotFound", "jobs.batch \"demo-a0\" not found"))
    assert gone.apply(job, DeleteWorkerJob("demo-a0"), Observed()) is None
    conflict = cluster_refusing(api_error(409, "Conflict", "the object has been modified"))
    error = conflict.apply(job, SetSuspend("demo-a0", True), Observed())
    assert error.what == "patch Job demo-a0 (suspend=true)" and not error.permanent


def test_a_status_body_that_is_not_json_still_gives_a_message():
    error = child_error("create Service demo-workers", 500, "Internal Server Error", b"etcdserver: request timed out")
    assert error.message == "etcdserver: request timed out" and error.reason == "Internal Server Error"
    assert child_error("x", 503, "Service Unavailable", None).message == "Service Unavailable"


def test_a_finished_job_is_not_failed_by_a_refused_cleanup(make_job):
    job = make_job(status={"phase": "Succeeded", "completionTime": "2026-01-02T00:00:00Z", "conditions": []},
                   runPolicy={"cleanPodPolicy": "All"})
    decision = reconcile(job, Observed(), NOW)
    settled = settle(job, decision, ChildError("delete Job demo-a0", 422, "Invalid", "no"), NOW)
    assert settled.status["phase"] == "Succeeded" and settled.events[0].reason == "ChildCreateFailed"


class FakeCluster:
    """The handler's view of the cluster: records what the pass does; creating a Job is refused."""

    def __init__(self, job: dict, error: ChildError | None):
        self.job, self.error = job, error
        self.applied, self.patched, self.events = [], [], []

    def get_job(self, namespace, name):
        return self.job

    def observe(self, job):
        return Observed()

    def apply(self, job, action, observed):
        self.applied.append(action)
        if isinstance(action, Create) and action.manifest["kind"] == "Job":
            return self.error
        return None

    def patch_status(self, job, status):
        self.patched.append(status)

    def post_event(self, job, event, now):
        self.events.append(event)


def test_the_handler_patches_the_refusal_into_status_and_posts_the_event(make_job):
    cluster = FakeCluster(make_job(), ChildError("create Job demo-a0", 422, "Invalid", INVALID_TOLERATION))
    operator_passes.reconcile_once(cluster, "ml", "demo")
    assert [type(a).__name__ for a in cluster.applied] == ["Create"] * 3  # Service, ConfigMap, then the refused Job
    (status,) = cluster.patched
    assert status["phase"] == "Failed" and INVALID_TOLERATION in status["conditions"][-1]["message"]
    assert [(e.type, e.reason) for e in cluster.events] == [("Warning", "ChildRejected")]


def test_finished_jobs_get_passes_only_for_ttl_or_cleanup(make_job):
    active = make_job(status={"phase": "Running"})
    assert wants_pass(active, NOW, resync=True)
    done = {"phase": "Succeeded", "completionTime": "2026-01-02T03:00:00Z"}
    assert not wants_pass(make_job(status=done), NOW, resync=True)
    assert not wants_pass(make_job(status=done), NOW, resync=False)
    with_ttl = make_job(status=done, runPolicy={"ttlSecondsAfterFinished": 600})
    assert not wants_pass(with_ttl, NOW, resync=True)
    assert wants_pass(with_ttl, NOW + dt.timedelta(minutes=10), resync=True)
    clean_all = make_job(status=done, runPolicy={"cleanPodPolicy": "All"})
    assert wants_pass(clean_all, NOW, resync=False) and not wants_pass(clean_all, NOW, resync=True)


def test_passes_for_one_job_never_overlap_and_triggers_fold_into_one_more(make_job, monkeypatch):
    import asyncio
    import threading

    running, overlaps, passes = set(), [], []
    release = threading.Event()

    def fake_pass(cluster, namespace, name, options, cached=None):
        if (namespace, name) in running:
            overlaps.append(name)
        running.add((namespace, name))
        passes.append(name)
        release.wait(5)
        running.discard((namespace, name))

    monkeypatch.setattr(operator_passes, "reconcile_once", fake_pass)

    async def scenario():
        controller = Controller(cluster=idle_cluster())
        key = controller.remember(make_job())
        other = controller.remember({**make_job(), "metadata": {"name": "other", "namespace": "ml", "uid": "2"}})
        controller.trigger(key)
        controller.trigger(other)  # another job runs in parallel
        await asyncio.sleep(0.2)
        for _ in range(10):  # a burst of pod events during the pass
            controller.trigger(key)
        release.set()
        await asyncio.sleep(0.3)
        await controller.drain()
        finished = controller.remember(make_job(status={"phase": "Succeeded", "completionTime": "2026-01-02T03:00:00Z"}))
        controller.trigger(finished, resync=True)  # nothing to do: no pass
        await controller.drain()

    asyncio.run(scenario())
    assert overlaps == [] and sorted(passes) == ["demo", "demo", "other"]
