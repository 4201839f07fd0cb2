"""The running kopf operator against KMock (a Kubernetes API emulator) over HTTP.

The test plays kubelet and the Job controller: it creates the pods of the worker Job
the operator created and moves their status; the operator must follow with the job's
status, events, restarts and, at the end, deletion.

What KMock cannot show (covered by the pure tests or left to tests/e2e on a cluster):
no garbage collection (children stay after their owner is deleted), no resourceVersion
bumps, no schema validation or defaulting of the CRD (label selectors on lists: the Emulator
below applies them), and no real Job controller or kubelet.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import threading
import time
from typing import Any, Callable

import aiohttp
import kopf
import kmock
import pytest
import pytest_asyncio
import yaml

from ddetr_operator import handlers
from operator_objects import free_port



def _selected(labels: dict, selector: str) -> bool:
    """Equality-based label selectors (`k=v`, `k!=v`, `k`, `!k`), as the API server applies them."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key) != value
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            ok = labels.get(key) == value
        else:
            ok = (term[1:] not in labels) if term.startswith("!") else term in labels
        if not ok:
            return False
    return True


class Emulator(kmock.KubernetesEmulator):
    """KMock plus `metadata.generateName`, which kopf's events use, and label selectors on lists,
    which the emulator lacks."""

    _generated = 0

    async def _serve_list(self, request):
        listed = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            listed = {**listed, "items": [item for item in listed["items"]
                                          if _selected((item.get("metadata") or {}).get("labels") or {}, selector)]}
        return listed

    async def _handle(self, request):
        data = request.data if isinstance(request.data, dict) else None
        if request.method == "POST" and data and data.get("metadata", {}).get("generateName") \
                and not data["metadata"].get("name"):
            Emulator._generated += 1
            data["metadata"]["name"] = f"{data['metadata']['generateName']}{Emulator._generated:05d}"
        return await super()._handle(request)


pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio, pytest.mark.kmock(cls=Emulator)]

JOBS = "/apis/ddetr.dev/v1alpha1/namespaces/ml/deformabledetrjobs"
BATCH_JOBS = "/apis/batch/v1/namespaces/ml/jobs"
PODS = "/api/v1/namespaces/ml/pods"
MERGE = {"Content-Type": "application/merge-patch+json"}


@pytest.fixture
def s3_status(moto_s3):
    """Rank 0's status.json, as the trainer writes it, in a real S3 endpoint."""
    endpoint, client = moto_s3
    client.put_object(Bucket="runs", Key="demo/train/status.json", Body=json.dumps({
        "epoch": 1, "num_epochs": 2, "step": 7, "last_loss": 3.25, "last_map": 0.125,
        "last_checkpoint": "s3://runs/demo/train/model_epoch_000.pth", "state": "running"}))
    return endpoint


@pytest.fixture
def kube(kmock, tmp_path, monkeypatch):
    """KMock with the resources the operator uses, and a kubeconfig that points at it."""
    info = kmock.ResourceInfo
    kmock.resources["ddetr.dev/v1alpha1/deformabledetrjobs"] = info(
        kind="DeformableDetrJob", singular="deformabledetrjob", namespaced=True, subresources={"status"},
        verbs={"list", "watch", "get", "patch", "create", "delete"})
    for resource, kind in [("v1/pods", "Pod"), ("v1/services", "Service"), ("v1/configmaps", "ConfigMap"),
                           ("v1/secrets", "Secret"), ("v1/events", "Event"), ("batch/v1/jobs", "Job")]:
        kmock.resources[resource] = info(kind=kind, namespaced=True, subresources={"status"},
                                         verbs={"list", "watch", "get", "patch", "create", "delete"})
    kmock.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs={"list", "watch", "get"})
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "kmock",
              "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
              "users": [{"name": "nobody", "user": {}}],
              "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "nobody"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return kmock


class Api:
    """A tiny async client for the test's side: what kubectl, kubelet and the Job controller do."""

    def __init__(self, session: aiohttp.ClientSession):
        self.session = session

    async def get(self, path: str) -> dict | None:
        async with self.session.get(path) as resp:
            return None if resp.status == 404 else await resp.json()

    async def items(self, path: str) -> list[dict]:
        return (await self.get(path) or {}).get("items", [])

    async def create(self, path: str, obj: dict) -> None:
        async with self.session.post(path, json=obj) as resp:
            assert resp.status < 300, await resp.text()

    async def patch(self, path: str, patch: dict) -> None:
        async with self.session.patch(path, data=json.dumps(patch), headers=MERGE) as resp:
            assert resp.status < 300, await resp.text()

    async def delete(self, path: str) -> None:
        async with self.session.delete(path) as resp:
            assert resp.status < 300, await resp.text()

    async def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    async def job_status(self, name: str) -> dict:
        return ((await self.get(f"{JOBS}/{name}")) or {}).get("status") or {}

    async def wait_phase(self, name: str, phase: str) -> dict:
        async def probe():
            status = await self.job_status(name)
            return status if status.get("phase") == phase else None
        return await self.wait_for(f"{name} to be {phase}", probe)

    async def run_pods(self, worker: dict, phase: str = "Running") -> list[str]:
        """Create the Indexed Job's pods as the Job controller would and mark them as kubelet would."""
        names = []
        template = worker["spec"]["template"]
        for index in range(worker["spec"]["completions"]):
            name = f"{worker['metadata']['name']}-{index}-abcde"
            labels = {**template["metadata"]["labels"], "job-name": worker["metadata"]["name"],
                      "batch.kubernetes.io/job-name": worker["metadata"]["name"],
                      "batch.kubernetes.io/job-completion-index": str(index)}
            await self.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "namespace": "ml", "labels": labels, "resourceVersion": "1",
                "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
                "spec": template["spec"], "status": {"phase": "Pending"}})
            await self.patch(f"{PODS}/{name}/status", {"status": {"phase": phase}})
            names.append(name)
        return names


def ddj(name: str, **spec: Any) -> dict:
    return {"apiVersion": "ddetr.dev/v1alpha1", "kind": "DeformableDetrJob",
            "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", "resourceVersion": "1",
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"image": "trainer:test", "nodes": 2, "gpusPerNode": 0, **spec}}


async def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    return {sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@contextlib.asynccontextmanager
async def running_operator(interval: float = 0.3):
    """The kopf operator with a fast resync interval, on its own thread and event loop.

    Its own loop because kopf, when it stops, cancels every task of the loop it ran in.
    """
    registry = handlers.register(kopf.OperatorRegistry(), interval=interval)
    metrics_port, liveness_port = free_port(), free_port()
    stop, ready = threading.Event(), threading.Event()
    operator_coroutine = kopf.operator(
        registry=registry, clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready,
        liveness_endpoint=f"http://127.0.0.1:{liveness_port}/healthz", memo=kopf.Memo(metrics_port=metrics_port))
    thread = threading.Thread(target=asyncio.run, args=(operator_coroutine,), daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 30), "the operator did not start"
        yield {"metrics_port": metrics_port, "liveness_port": liveness_port}
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive(), "the operator did not stop"


@pytest_asyncio.fixture
async def operator(kube):
    async with running_operator() as ports:
        yield ports


async def test_job_lifecycle_with_restart_progress_events_and_deletion(kube, operator, s3_status):
    async with aiohttp.ClientSession(base_url=str(kube.url)) as session:
        api = Api(session)
        await api.create("/api/v1/namespaces/ml/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": "s3", "namespace": "ml"}, "data": {
            "AWS_ACCESS_KEY_ID": base64.b64encode(b"test-key").decode(),
            "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"test-secret").decode()}})
        await api.create(JOBS, ddj("demo", runPolicy={"backoffLimit": 2}, experiment={"train": {"num_epochs": 2}},
                                   artifacts={"uri": "s3://runs/demo", "endpoint": s3_status,
                                              "credentialsSecret": {"name": "s3"}}))

        # Children appear, owned by the job.
        worker = await api.wait_for("worker Job a0", lambda: api.get(f"{BATCH_JOBS}/demo-a0"))
        assert worker["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"
        assert await api.get("/api/v1/namespaces/ml/services/demo-workers")
        configmap = await api.get("/api/v1/namespaces/ml/configmaps/demo-spec")
        assert yaml.safe_load(configmap["data"]["spec.yaml"])["results_dir"] == "s3://runs/demo"
        status = await api.wait_phase("demo", "Pending")
        assert status["workerJob"] == "demo-a0" and status["restarts"] == 0

        # kubelet: both pods run -> Running, with rank 0's progress read from S3.
        pods = await api.run_pods(worker)
        status = await api.wait_phase("demo", "Running")
        assert status["workersReady"] == 2
        status = await api.wait_for("progress", lambda: _with_progress(api))
        assert status["epochs"] == "1/2"
        assert status["progress"]["lastMap"] == 0.125
        assert status["progress"]["lastCheckpoint"] == "s3://runs/demo/train/model_epoch_000.pth"

        # Worker 1 is OOM-killed: attempt 1 is recorded, and starts once the old gang is gone.
        await api.patch(f"{PODS}/{pods[1]}/status", {"status": {"phase": "Failed", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                                         "finishedAt": "2026-01-01T01:00:00Z"}}}]}})
        status = await api.wait_phase("demo", "Restarting")
        assert status["restarts"] == 1 and status["attempt"] == 1
        assert status["lastFailure"]["exitCode"] == 137 and status["lastFailure"]["reason"] == "OOMKilled"
        restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
        assert restarting["reason"] == "OOMKilled" and "exited with code 137" in restarting["message"]
        await asyncio.sleep(1.5)
        assert await _gone(api, f"{BATCH_JOBS}/demo-a1")  # rank 0 of attempt 0 still runs: no overlap
        # The Job controller (none in KMock: the test plays it) stops rank 0 and fails the Job.
        await api.patch(f"{PODS}/{pods[0]}/status", {"status": {"phase": "Failed", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]}})
        await api.patch(f"{BATCH_JOBS}/demo-a0/status", {"status": {"conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
        worker = await api.wait_for("worker Job a1", lambda: api.get(f"{BATCH_JOBS}/demo-a1"))
        assert await api.get(f"{BATCH_JOBS}/demo-a0")  # the failed attempt's Job stays, for its logs
        env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["PET_MASTER_ADDR"] == "demo-a1-0.demo-workers.ml.svc"

        # The new gang runs and the Job controller reports completion.
        pods = await api.run_pods(worker)
        await api.wait_phase("demo", "Running")
        for name in pods:
            await api.patch(f"{PODS}/{name}/status", {"status": {"phase": "Succeeded"}})
        await api.patch(f"{BATCH_JOBS}/demo-a1/status", {"status": {"conditions": [
            {"type": "Complete", "status": "True"}]}})
        status = await api.wait_phase("demo", "Succeeded")
        assert status["completionTime"] and status["restarts"] == 1

        # Events for every transition, on the job.
        async def reasons():
            found = {e["reason"] for e in await api.items("/api/v1/namespaces/ml/events")
                     if e.get("involvedObject", {}).get("name") == "demo"}
            return found if {"GangCreated", "AllWorkersRunning", "OOMKilled", "Completed"} <= found else None
        await api.wait_for("events", reasons)

        # The operator's metrics and health endpoint.
        samples = await scrape(operator["metrics_port"])
        assert samples['ddetr_operator_jobs{"phase": "Succeeded"}'] == 1
        assert samples['ddetr_operator_job_restarts_total{"namespace": "ml"}'] == 1
        assert samples["ddetr_operator_reconcile_duration_seconds_count{}"] > 3
        async with aiohttp.ClientSession() as plain:
            async with plain.get(f"http://127.0.0.1:{operator['liveness_port']}/healthz") as resp:
                assert resp.status == 200
                assert "jobs_known" in await resp.json()

        # kubectl delete: the operator forgets the job (children would go by GC, which KMock lacks).
        await api.delete(f"{JOBS}/demo")
        async def forgotten():
            return (await scrape(operator["metrics_port"]))['ddetr_operator_jobs{"phase": "Succeeded"}'] == 0
        await api.wait_for("metrics to forget the job", forgotten)


async def _with_progress(api: Api) -> dict | None:
    status = await api.job_status("demo")
    return status if status.get("progress") else None


async def _gone(api: Api, path: str) -> bool:
    return await api.get(path) is None


async def test_invalid_spec_fails_without_pods_and_ttl_deletes_it(kube, operator):
    async with aiohttp.ClientSession(base_url=str(kube.url)) as session:
        api = Api(session)
        await api.create(JOBS, ddj("broken", artifacts={"uri": "s3://runs/broken"},
                                   experiment={"model": {"backbone": "resnet_5000"}}))
        status = await api.wait_phase("broken", "Failed")
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidSpec"
        assert failed["message"].startswith("spec.experiment.model.backbone: 'resnet_5000' is not accepted")
        assert await api.items(BATCH_JOBS) == [] and await api.items(PODS) == []

        # Permanent exit code: one run, no restart.
        await api.create(JOBS, ddj("baddata", artifacts={"uri": "s3://runs/baddata"}, nodes=1))
        worker = await api.wait_for("worker Job", lambda: api.get(f"{BATCH_JOBS}/baddata-a0"))
        (pod,) = await api.run_pods(worker, phase="Pending")
        await api.patch(f"{PODS}/{pod}/status", {"status": {"phase": "Failed", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 2, "message": "error: dataset.json_file: not found"}}}]}})
        status = await api.wait_phase("baddata", "Failed")
        assert status["restarts"] == 0
        assert "dataset.json_file: not found" in status["conditions"][-1]["message"]

        # ttlSecondsAfterFinished: the finished job is deleted by the operator.
        await api.patch(f"{JOBS}/broken", {"spec": {"runPolicy": {"ttlSecondsAfterFinished": 0}}})
        await api.wait_for("ttl deletion", lambda: _gone(api, f"{JOBS}/broken"))


async def test_operator_restart_creates_nothing_twice_and_suspend_resumes(kube):
    async with aiohttp.ClientSession(base_url=str(kube.url)) as session:
        api = Api(session)
        async with running_operator():
            await api.create(JOBS, ddj("paused", nodes=1, artifacts={"uri": "s3://runs/paused"}))
            worker = await api.wait_for("worker Job", lambda: api.get(f"{BATCH_JOBS}/paused-a0"))
            (pod,) = await api.run_pods(worker)
            await api.wait_phase("paused", "Running")
        creates = len(kube["post"])
        assert creates >= 5  # the job, its Service, ConfigMap, worker Job and pod (and events)

        # A new operator process finds everything in place: it creates nothing.
        status_patches = kube[f"patch {JOBS}/paused/status"]
        patched = len(status_patches)
        assert patched >= 2  # Pending, Running
        async with running_operator():
            await asyncio.sleep(1.5)  # several passes
            assert len(kube["post"]) == creates
            assert len(status_patches) == patched  # an unchanged status is not rewritten
            assert (await api.job_status("paused"))["phase"] == "Running"

            # Suspend: the worker Job is suspended (the Job controller then removes its pods).
            await api.patch(f"{JOBS}/paused", {"spec": {"runPolicy": {"suspend": True}}})
            await api.wait_for("worker suspended", lambda: _suspended(api, "paused-a0", True))
            await api.delete(f"{PODS}/{pod}")
            status = await api.wait_phase("paused", "Suspended")
            assert status["workersReady"] == 0

            # Resume: the same Job runs again; the trainer resumes from its checkpoint.
            await api.patch(f"{JOBS}/paused", {"spec": {"runPolicy": {"suspend": False}}})
            await api.wait_for("worker resumed", lambda: _suspended(api, "paused-a0", False))
            status = await api.wait_phase("paused", "Pending")
            assert next(c for c in status["conditions"] if c["type"] == "Created")["reason"] == "Resumed"
            await api.run_pods(await api.get(f"{BATCH_JOBS}/paused-a0"))
            status = await api.wait_phase("paused", "Running")
            assert status["restarts"] == 0


async def _suspended(api: Api, worker: str, value: bool) -> bool:
    job = await api.get(f"{BATCH_JOBS}/{worker}")
    return bool(job) and job["spec"].get("suspend") is value


async def test_command_line_operator_watches_its_namespace_and_serves_probes_and_metrics(kube):
    liveness_port, metrics_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ddetr_operator", "--namespace", "ml", "--reconcile-interval", "0.3",
        "--liveness", f"http://127.0.0.1:{liveness_port}/healthz", "--metrics-port", str(metrics_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession(base_url=str(kube.url)) as session:
            api = Api(session)
            await api.create(JOBS, ddj("cli", nodes=1, artifacts={"uri": "s3://runs/cli"}))
            elsewhere = ddj("elsewhere", nodes=1, artifacts={"uri": "s3://runs/x"})
            elsewhere["metadata"]["namespace"] = "other"
            await api.create("/apis/ddetr.dev/v1alpha1/namespaces/other/deformabledetrjobs", elsewhere)
            await api.wait_for("worker Job", lambda: api.get(f"{BATCH_JOBS}/cli-a0"), timeout=60)
            await api.wait_phase("cli", "Pending")

            async def healthy():
                try:
                    async with aiohttp.ClientSession() as plain:
                        async with plain.get(f"http://127.0.0.1:{liveness_port}/healthz") as resp:
                            return resp.status == 200
                except aiohttp.ClientError:
                    return False
            await api.wait_for("liveness endpoint", healthy)
            samples = await scrape(metrics_port)
            assert samples['ddetr_operator_jobs{"phase": "Pending"}'] == 1
            other = await api.get("/apis/ddetr.dev/v1alpha1/namespaces/other/deformabledetrjobs/elsewhere")
            assert "status" not in other  # not a watched namespace
    finally:
        process.terminate()
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()[-3000:]


async def test_no_finalizer_is_ever_added_and_the_old_kopf_finalizer_is_removed(kube, operator):
    """kubectl delete and namespace deletion must not hang while the operator is down: no finalizer.

    A job left with the finalizer of the operator's timer days (`kopf.zalando.org/KopfFinalizerMarker`)
    loses it on its first event. (kopf removes it with a JSON patch guarded by a resourceVersion
    test; KMock never bumps resourceVersions, so a stale event can make kopf repeat that patch
    here: that other controllers' finalizers stay is for tests/e2e on a real API server.)
    """
    async with aiohttp.ClientSession(base_url=str(kube.url)) as session:
        api = Api(session)
        await api.create(JOBS, ddj("plain", nodes=1, artifacts={"uri": "s3://runs/plain"},
                                   runPolicy={"cleanPodPolicy": "All"}))
        legacy = ddj("legacy", nodes=1, artifacts={"uri": "s3://runs/legacy"})
        legacy["metadata"]["finalizers"] = [handlers.LEGACY_FINALIZER]
        await api.create(JOBS, legacy)

        async def finalizers_of(name: str) -> list[str]:
            return ((await api.get(f"{JOBS}/{name}")) or {}).get("metadata", {}).get("finalizers") or []

        async def migrated():
            return await finalizers_of("legacy") == []
        await api.wait_for("the old finalizer to be removed", migrated)

        # A whole life: created, running, succeeded, its gang cleaned away (cleanPodPolicy All).
        worker = await api.wait_for("worker Job", lambda: api.get(f"{BATCH_JOBS}/plain-a0"))
        (pod,) = await api.run_pods(worker)
        await api.wait_phase("plain", "Running")
        await api.patch(f"{PODS}/{pod}/status", {"status": {"phase": "Succeeded"}})
        await api.patch(f"{BATCH_JOBS}/plain-a0/status", {"status": {"conditions": [
            {"type": "Complete", "status": "True"}]}})
        await api.wait_phase("plain", "Succeeded")
        await api.wait_for("finished gang deleted", lambda: _gone(api, f"{BATCH_JOBS}/plain-a0"))
        await asyncio.sleep(1)  # several resyncs
        assert await finalizers_of("plain") == []

        # No request of the operator ever wrote a finalizer onto a job.
        for request in kube["patch"]:
            path = request.url.path
            if path.startswith(JOBS) and not path.endswith("/status"):
                patches = request.data if isinstance(request.data, list) else [request.data]
                for patch in patches:
                    text = json.dumps(patch)
                    assert "plain" not in path or "finalizers" not in text, text
                    if "finalizers" in text:  # only ever the removal of the old marker
                        assert path.endswith("/legacy") and patch.get("op") == "remove", text


async def test_no_handler_makes_kopf_add_a_finalizer():
    """Timers, daemons and on.delete handlers make kopf put a finalizer on every job (nolar/kopf#1074)."""
    registry = handlers.register(kopf.OperatorRegistry())
    assert not registry._spawning.get_all_handlers(), "timers or daemons force a finalizer"
    assert not registry._changing.get_all_handlers(), "on.create/update/delete handlers keep kopf's state and finalizers"
    assert len(registry._watching.get_all_handlers()) == 3  # the jobs, their batch Jobs and their Pods


async def test_children_events_drive_the_job_without_waiting_for_the_resync(kube):
    """With a resync far away, a pod's change still moves its job at once: child events trigger passes."""
    async with aiohttp.ClientSession(base_url=str(kube.url)) as session, running_operator(interval=3600):
        api = Api(session)
        await api.create(JOBS, ddj("quick", artifacts={"uri": "s3://runs/quick"}))
        worker = await api.wait_for("worker Job", lambda: api.get(f"{BATCH_JOBS}/quick-a0"), timeout=10)
        pods = await api.run_pods(worker)
        await api.wait_for("Running", lambda: _phase_is(api, "quick", "Running"), timeout=10)
        await api.patch(f"{PODS}/{pods[0]}/status", {"status": {"phase": "Failed", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]}})
        await api.wait_for("Restarting", lambda: _phase_is(api, "quick", "Restarting"), timeout=10)
        # The Job controller (played here) stops the rest of the gang: that pod event starts attempt 1.
        await api.patch(f"{PODS}/{pods[1]}/status", {"status": {"phase": "Failed", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]}})
        await api.wait_for("worker Job a1", lambda: api.get(f"{BATCH_JOBS}/quick-a1"), timeout=10)


async def _phase_is(api: Api, name: str, phase: str) -> bool:
    return (await api.job_status(name)).get("phase") == phase


async def test_a_gang_the_api_server_refuses_fails_the_job_with_its_message(kube, operator):
    """No silent Pending: a 422 on the worker Job reaches the job's status and events, verbatim."""
    message = ('Job.batch "refused-a0" is invalid: spec.template.spec.tolerations[0].operator: '
               "Invalid value: \"Sometimes\": a valid toleration operator must be 'Exists' or 'Equal'")
    kube[f"post {BATCH_JOBS}"] << 422 << {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                          "message": message, "reason": "Invalid", "code": 422}
    async with aiohttp.ClientSession(base_url=str(kube.url)) as session:
        api = Api(session)
        await api.create(JOBS, ddj("refused", nodes=1, artifacts={"uri": "s3://runs/refused"}))
        status = await api.wait_phase("refused", "Failed")
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "ChildRejected"
        assert failed["message"] == f"create Job refused-a0 was refused by the API server (422 Invalid): {message}"

        async def warning():
            return [e for e in await api.items("/api/v1/namespaces/ml/events")
                    if e.get("involvedObject", {}).get("name") == "refused" and e["reason"] == "ChildRejected"]
        (event,) = await api.wait_for("the Warning event", warning)
        assert event["type"] == "Warning" and message in event["message"]
