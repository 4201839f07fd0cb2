"""What a pass costs in API requests: the child index the watch keeps, cached passes, the Secret cache.

A fake API client (each call counted, answers from an in-memory cluster) stands in for the
API server; the real `kube.Cluster` and `passes.reconcile_once` run on it.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import json
import time

from kubernetes.client.exceptions import ApiException

from ddetr_operator import passes
from ddetr_operator.api import Artifacts, CredentialsSecret, resolve
from ddetr_operator.children import ChildIndex
from ddetr_operator.controller import Controller
from ddetr_operator.decide import Observed
from ddetr_operator.kube import Cluster
from ddetr_operator.options import Options

from operator_objects import idle_cluster, pod, worker_job


def versioned(obj: dict, version: int, uid: str | None = None) -> dict:
    obj = copy.deepcopy(obj)
    obj["metadata"]["resourceVersion"] = str(version)
    obj["metadata"]["uid"] = uid or f"uid-{obj['metadata']['name']}"
    return obj


class Response:
    def __init__(self, data):
        self.data = json.dumps(data)


class FakeApi:
    """CoreV1Api, BatchV1Api and CustomObjectsApi in one: every call is counted in `calls`."""

    def __init__(self, job: dict, jobs=(), pods=(), secret: dict | None = None):
        self.job, self.jobs, self.pods, self.secret = job, list(jobs), list(pods), secret
        self.calls: list[str] = []
        self.patches: list[dict] = []
        self.version = 100

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return getattr(self, f"_{name}", self._default)(*args, **kwargs)
        return call

    def _default(self, *args, **kwargs):
        return Response({})

    def _get_namespaced_custom_object(self, *args, **kwargs):
        return Response(self.job)

    def _list_namespaced_job(self, *args, **kwargs):
        return Response({"metadata": {"resourceVersion": str(self.version)}, "items": self.jobs})

    def _list_namespaced_pod(self, *args, **kwargs):
        return Response({"metadata": {"resourceVersion": str(self.version)}, "items": self.pods})

    def _list_namespaced_event(self, *args, **kwargs):
        return Response({"items": []})

    def _read_namespaced_secret(self, name, namespace, **kwargs):
        if self.secret is None:
            raise ApiException(status=404, reason="Not Found")
        return Response(self.secret)

    def _patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, body, **kwargs):
        self.patches.append(body["status"])
        self.version += 1
        self.job = copy.deepcopy(self.job)
        self.job.setdefault("status", {}).update(body["status"])
        self.job["metadata"]["resourceVersion"] = str(self.version)
        return Response(self.job)


def fake_cluster(api: FakeApi, secret_ttl: float = 300.0) -> Cluster:
    cluster = Cluster(api_client=None, secret_ttl=secret_ttl)  # the real state, then the fake APIs
    cluster.core = cluster.batch = cluster.custom = cluster.networking = api
    return cluster


def running_job(make_job, **status) -> dict:
    job = make_job(nodes=1, status={"phase": "Running", "attempt": 0, "restarts": 0, "workersReady": 1,
                                    "workerJob": "demo-a0", "startTime": "2026-01-02T00:00:00Z",
                                    "conditions": [], **status})
    del job["spec"]["artifacts"]  # results on a volume, not S3: no progress reads in these tests
    job["spec"]["experiment"]["results_dir"] = "/data/runs/demo"
    return versioned(job, 50, uid="0000-1111")


def settled(make_job) -> tuple[dict, FakeApi, Cluster]:
    """A running one-node job whose children are all there, after one full pass (its status settled)."""
    job = running_job(make_job)
    api = FakeApi(job, jobs=[versioned(worker_job("demo", 0), 10)], pods=[versioned(pod("demo", 0, 0, "Running"), 11)])
    cluster = fake_cluster(api)
    result = passes.reconcile_once(cluster, "ml", "demo")
    assert result.kind == "full"
    api.calls.clear()
    return (result.body or api.job), api, cluster


# --- the child index ------------------------------------------------------------------------------

def test_the_index_follows_watch_events_and_drops_deleted_and_older_ones():
    index = ChildIndex()
    first = versioned(pod("demo", 0, 0, "Pending"), 5)
    assert index.record("pods", "ADDED", first) == ("ml", "demo")
    index.record("pods", "MODIFIED", versioned(pod("demo", 0, 0, "Running"), 7))
    index.record("pods", "MODIFIED", versioned(pod("demo", 0, 0, "Pending"), 6))  # older: dropped
    index.record("jobs", None, versioned(worker_job("demo", 0), 4))  # kopf's initial listing: no type
    jobs, pods = index.children("ml", "demo")
    assert [j["metadata"]["name"] for j in jobs] == ["demo-a0"]
    assert [p["status"]["phase"] for p in pods] == ["Running"]
    index.record("pods", "DELETED", versioned(pod("demo", 0, 0, "Running"), 8))
    assert index.children("ml", "demo") == ([versioned(worker_job("demo", 0), 4)], [])
    assert index.record("pods", "ADDED", {"metadata": {"name": "stray", "namespace": "ml"}}) is None  # not ours


def test_a_list_answered_before_a_deletion_does_not_bring_the_child_back_and_clears_ghosts():
    index = ChildIndex()
    alive, ghost = versioned(pod("demo", 0, 0, "Running"), 5), versioned(pod("demo", 0, 1, "Running"), 6)
    index.record("pods", "ADDED", alive)
    index.record("pods", "ADDED", ghost)  # its DELETED was lost in a watch gap
    newer = versioned(pod("demo", 1, 0, "Pending"), 30)
    index.record("pods", "ADDED", newer)  # created after the LIST below was answered
    index.record("pods", "DELETED", alive)
    index.merge_list("ml", "demo", "pods", [alive], "20")  # the LIST still had `alive`, not `ghost`
    assert [p["metadata"]["name"] for p in index.children("ml", "demo")[1]] == [newer["metadata"]["name"]]
    # Where resourceVersions are not numbers (KMock), a LIST is the whole truth.
    index.merge_list("ml", "demo", "pods", [], None)
    assert index.children("ml", "demo") == ([], []) and len(index) == 0


def test_the_index_keeps_no_managed_fields():
    index = ChildIndex()
    obj = versioned(pod("demo", 0, 0, "Running"), 5)
    obj["metadata"]["managedFields"] = [{"manager": "kubelet"}]
    index.record("pods", "ADDED", obj)
    assert "managedFields" not in index.children("ml", "demo")[1][0]["metadata"]


# --- cached passes --------------------------------------------------------------------------------

def test_a_running_job_with_nothing_new_costs_no_request(make_job):
    job, api, cluster = settled(make_job)
    for kind, obj in (("jobs", api.jobs[0]), ("pods", api.pods[0])):
        cluster.children.record(kind, "ADDED", obj)
    for _ in range(5):
        result = passes.reconcile_once(cluster, "ml", "demo", cached=job)
        assert result.kind == "cached"
    assert api.calls == []


def test_before_any_full_pass_or_with_a_gang_short_of_pods_the_pass_is_full(make_job):
    job = running_job(make_job)
    api = FakeApi(job, jobs=[versioned(worker_job("demo", 0), 10)], pods=[])
    cluster = fake_cluster(api)
    assert cluster.observe_cached(job) is None  # nothing seen yet
    cluster.observe(job)
    assert cluster.observe_cached(job) is None  # the worker Job lacks its pod: only a LIST of events tells why
    assert passes.reconcile_once(cluster, "ml", "demo", cached=job).kind == "full"
    assert "list_namespaced_event" in api.calls


def test_a_child_event_that_changes_the_decision_makes_a_full_pass_from_fresh_reads(make_job):
    job, api, cluster = settled(make_job)
    failed = versioned(pod("demo", 0, 0, "Failed", exit_code=137, reason="OOMKilled"), 12)
    cluster.children.record("pods", "MODIFIED", failed)  # the watch says the pod failed
    api.pods = [failed]  # (and so does the API server)
    result = passes.reconcile_once(cluster, "ml", "demo", cached=job)
    assert result.kind == "full"
    assert api.calls[:3] == ["get_namespaced_custom_object", "list_namespaced_job", "list_namespaced_pod"]
    (patch,) = api.patches[-1:]
    assert patch["phase"] == "Restarting" and patch["attempt"] == 1 and patch["restarts"] == 1
    assert result.body["status"]["attempt"] == 1 and result.body["metadata"]["resourceVersion"] == str(api.version)


def test_a_stale_body_never_counts_a_failure_twice(make_job):
    """The cached body may lag the status the operator wrote; the pass that acts reads it fresh."""
    job, api, cluster = settled(make_job)
    failed = versioned(pod("demo", 0, 0, "Failed", exit_code=137, reason="OOMKilled"), 12)
    cluster.children.record("pods", "MODIFIED", failed)
    api.pods = [failed]
    passes.reconcile_once(cluster, "ml", "demo", cached=job)
    patches = len(api.patches)
    # The next pass still holds the body from before the restart was recorded (its watch event lags).
    result = passes.reconcile_once(cluster, "ml", "demo", cached=job)
    assert result.kind == "full" and api.job["status"]["restarts"] == 1 and api.job["status"]["attempt"] == 1
    assert all(p.get("restarts", 1) == 1 for p in api.patches[patches:])


def test_a_progress_change_alone_is_one_patch_of_the_progress_fields(make_job, monkeypatch):
    job, api, cluster = settled(make_job)
    for kind, obj in (("jobs", api.jobs[0]), ("pods", api.pods[0])):
        cluster.children.record(kind, "ADDED", obj)
    monkeypatch.setattr(passes, "_read_progress", lambda *args: {"epoch": 1, "num_epochs": 3, "step": 9})
    result = passes.reconcile_once(cluster, "ml", "demo", cached=job)
    assert result.kind == "progress" and api.calls == ["patch_namespaced_custom_object_status"]
    assert set(api.patches[-1]) == {"progress", "epochs"} and api.patches[-1]["epochs"] == "1/3"
    assert passes.reconcile_once(cluster, "ml", "demo", cached=result.body).kind == "cached"
    assert len(api.calls) == 1


def test_finished_jobs_passes_are_full_ones(make_job):
    job, api, cluster = settled(make_job)
    done = copy.deepcopy(job)
    done["status"]["phase"] = "Succeeded"
    api.job = done
    assert passes.reconcile_once(cluster, "ml", "demo", cached=done).kind == "full"


# --- the Secret's keys ----------------------------------------------------------------------------

def secret(key_id: str) -> dict:
    return {"data": {"AWS_ACCESS_KEY_ID": base64.b64encode(key_id.encode()).decode(),
                     "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"s").decode()}}


def test_the_secrets_keys_are_read_once_per_ttl(make_job, monkeypatch):
    api = FakeApi(make_job(), secret=secret("k1"))
    cluster = fake_cluster(api, secret_ttl=300)
    artifacts = Artifacts(uri="s3://runs/demo", credentials_secret=CredentialsSecret(name="s3"), endpoint="http://s3")
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    assert cluster.s3_access("ml", artifacts).access_key_id == "k1"
    api.secret = secret("k2")
    clock[0] += 299
    assert cluster.s3_access("ml", artifacts).access_key_id == "k1"
    assert api.calls == ["read_namespaced_secret"]
    clock[0] += 2
    assert cluster.s3_access("ml", artifacts).access_key_id == "k2"  # a rotated Secret, seen after the TTL
    assert cluster.s3_access("ml", artifacts, read_secret=False).access_key_id is None
    assert api.calls == ["read_namespaced_secret"] * 2


def test_a_missing_secret_is_looked_for_again_sooner(make_job, monkeypatch):
    api = FakeApi(make_job(), secret=None)
    cluster = fake_cluster(api, secret_ttl=300)
    artifacts = Artifacts(uri="s3://runs/demo", credentials_secret=CredentialsSecret(name="s3"))
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    assert cluster.s3_access("ml", artifacts).access_key_id is None
    api.secret = secret("k1")
    clock[0] += 31
    assert cluster.s3_access("ml", artifacts).access_key_id == "k1"
    assert fake_cluster(FakeApi(make_job()), secret_ttl=0).secret_keys._kept == {}  # ttl 0: read every time


# --- the controller: which pass, which body -------------------------------------------------------

def test_the_first_pass_is_full_then_cached_until_full_pass_every(make_job, monkeypatch):
    kinds = []

    def fake_pass(cluster, namespace, name, options, cached=None):
        kinds.append("cached" if cached is not None else "full")
        return passes.PassResult("cached" if cached is not None else "full")

    monkeypatch.setattr(passes, "reconcile_once", fake_pass)

    async def scenario(options):
        controller = Controller(cluster=idle_cluster(), options=options)
        key = controller.remember(running_job(make_job))
        for _ in range(3):
            controller.trigger(key)
            await controller.drain()
        controller._full_due[key] = 0.0  # its full_pass_every ran out
        controller.trigger(key)
        await controller.drain()

    asyncio.run(scenario(Options()))
    assert kinds == ["full", "cached", "cached", "full"]
    kinds.clear()
    asyncio.run(scenario(Options(full_pass_every=0)))  # the operator as it was: every pass full
    assert kinds == ["full"] * 4


def test_the_table_keeps_the_newest_body_and_ignores_the_echo_of_its_own_write(make_job):
    controller = Controller(cluster=idle_cluster())
    job = running_job(make_job)
    key = controller.remember(job)
    patched = versioned(job, 60, uid=job["metadata"]["uid"])
    patched["status"]["workersReady"] = 0
    controller.keep(key, patched)
    assert controller.jobs[key] is patched
    assert not controller.is_news(copy.deepcopy(patched))  # the watch brings back the operator's own patch
    assert not controller.is_news(job)  # an event older than the patch
    controller.keep(key, job)  # a pass's older body never replaces a newer one
    assert controller.jobs[key] is patched
    edited = versioned(patched, 61, uid=job["metadata"]["uid"])
    assert controller.is_news(edited)
    # Without comparable resourceVersions (KMock keeps one for ever), content decides and the watch rules.
    unversioned = copy.deepcopy(job)
    unversioned["metadata"].pop("resourceVersion")
    key = controller.remember(unversioned)
    changed = copy.deepcopy(unversioned)
    changed["spec"]["runPolicy"] = {"suspend": True}
    assert controller.is_news(changed) and not controller.is_news(copy.deepcopy(unversioned))
    controller.keep(key, patched)
    assert controller.jobs[key] is unversioned


def test_forgetting_a_job_drops_its_children_and_support_children(make_job):
    job, api, cluster = settled(make_job)
    cluster.children.record("pods", "ADDED", api.pods[0])
    controller = Controller(cluster=cluster)
    key = controller.remember(job)
    controller.forget(key)
    assert cluster.children.children("ml", "demo") == ([], []) and cluster.observe_cached(job) is None


def test_observe_cached_uses_the_support_children_seen_or_created(make_job):
    job = running_job(make_job)
    api = FakeApi(job)
    api._read_namespaced_service = lambda *a, **k: (_ for _ in ()).throw(ApiException(status=404))
    cluster = fake_cluster(api)
    observed = cluster.observe(job)
    assert observed.service is False and observed.configmap is True
    from ddetr_operator.decide import Create
    from ddetr_operator.render import render_service
    assert cluster.apply(job, Create(render_service(resolve(job))), Observed()) is None
    assert cluster.observe_cached(job).service is True


def test_goodput_rides_on_the_progress_patch_and_a_moving_clock_alone_patches_nothing(make_job, monkeypatch):
    """Issue 33: accounting the job's time costs no request of its own."""
    monkeypatch.setattr(passes, "_read_progress", lambda *args: None)
    job = make_job(nodes=1, status={"phase": "Running", "attempt": 0, "restarts": 0, "workersReady": 1,
                                    "workerJob": "demo-a0", "startTime": "2026-01-02T00:00:00Z", "conditions": []})
    job["spec"]["artifacts"].pop("credentialsSecret")
    job["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    job = versioned(job, 50, uid="0000-1111")
    api = FakeApi(job, jobs=[versioned(worker_job("demo", 0), 10)], pods=[versioned(pod("demo", 0, 0, "Running"), 11)])
    cluster = fake_cluster(api)
    assert passes.reconcile_once(cluster, "ml", "demo").kind == "full"
    api.calls.clear()
    job = api.job
    for kind, obj in (("jobs", api.jobs[0]), ("pods", api.pods[0])):
        cluster.children.record(kind, "ADDED", obj)
    monkeypatch.setattr(passes, "_read_progress", lambda *args: {"epoch": 1, "num_epochs": 3, "step": 9,
                                                                  "train_seconds": 50.0, "eval_seconds": 5.0})
    result = passes.reconcile_once(cluster, "ml", "demo", cached=job)
    assert result.kind == "progress" and api.calls == ["patch_namespaced_custom_object_status"]
    assert set(api.patches[-1]) == {"progress", "epochs", "goodput"}
    assert api.patches[-1]["goodput"]["trainingSeconds"] == 50.0
    assert passes.reconcile_once(cluster, "ml", "demo", cached=result.body).kind == "cached"
    assert len(api.calls) == 1
