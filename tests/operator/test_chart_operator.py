"""The operator process started exactly as the chart's Deployment starts it (its args and env),
against KMock (a Kubernetes API emulator) over HTTP: the probes' /healthz answers on the health
port, /metrics on the metrics port, and in namespaced mode it reconciles a job in its namespace."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_chart import CHART, KUBE_VERSION, needs_helm, _helm, _one, _values_file

aiohttp = pytest.importorskip("aiohttp")
kmock = pytest.importorskip("kmock", reason="kmock (the operator's test dependency) is not installed")

NAMESPACE = "ml"
JOBS = f"/apis/ddetr.dev/v1alpha1/namespaces/{NAMESPACE}/deformabledetrjobs"


class _Emulator(kmock.KubernetesEmulator):
    """KMock, plus names for objects posted with only `metadata.generateName` (kopf's events)."""

    _counter = 0

    async def _handle(self, request):
        data = request.data if isinstance(request.data, dict) else None
        metadata = (data or {}).get("metadata") or {}
        if request.method == "POST" and metadata.get("generateName") and not metadata.get("name"):
            _Emulator._counter += 1
            metadata["name"] = f"{metadata['generateName']}{_Emulator._counter:05d}"
        return await super()._handle(request)


pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio, pytest.mark.kmock(cls=_Emulator)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deployment_container(tmp_path: Path, values: dict) -> dict:
    args = ["template", "ddetr", str(CHART), "--namespace", "ddetr-system", "--kube-version", KUBE_VERSION,
            "--values", _values_file(tmp_path, values)]
    docs = [doc for doc in yaml.safe_load_all(_helm(*args).stdout) if doc]
    return _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _kubeconfig(tmp_path: Path, url: str) -> Path:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "kmock",
              "clusters": [{"name": "kmock", "cluster": {"server": url.rstrip("/")}}],
              "users": [{"name": "nobody", "user": {}}],
              "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "nobody"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def _register_resources(emulator) -> None:
    info = emulator.ResourceInfo
    verbs = {"list", "watch", "get", "patch", "create", "delete"}
    emulator.resources["ddetr.dev/v1alpha1/deformabledetrjobs"] = info(
        kind="DeformableDetrJob", singular="deformabledetrjob", namespaced=True, subresources={"status"}, verbs=verbs)
    for resource, kind in [("v1/pods", "Pod"), ("v1/services", "Service"), ("v1/configmaps", "ConfigMap"),
                           ("v1/secrets", "Secret"), ("v1/events", "Event"), ("batch/v1/jobs", "Job")]:
        emulator.resources[resource] = info(kind=kind, namespaced=True, subresources={"status"}, verbs=verbs)
    emulator.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs={"list", "watch", "get"})


async def _get(session, url: str) -> tuple[int, str]:
    try:
        async with session.get(url) as response:
            return response.status, await response.text()
    except aiohttp.ClientError:
        return 0, ""


async def _wait_for(what: str, probe, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.3)


@needs_helm
async def test_operator_started_as_the_chart_starts_it_serves_probes_metrics_and_reconciles(kmock, tmp_path):
    _register_resources(kmock)
    health_port, metrics_port = _free_port(), _free_port()
    container = _deployment_container(tmp_path, {
        "operator": {"healthPort": health_port, "metricsPort": metrics_port, "reconcileIntervalSeconds": 0.5},
        "watch": {"namespaces": [NAMESPACE]}})
    # The console script pip installed beside the interpreter running the tests, as the image runs it.
    command = [os.path.join(os.path.dirname(sys.executable), "ddetr-operator")]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e},
           "KUBECONFIG": str(_kubeconfig(tmp_path, str(kmock.url))), "HOME": str(tmp_path)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    process = subprocess.Popen([*command, *container["args"]], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probes = {name: container[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    try:
        async with aiohttp.ClientSession() as session:
            for name, probe in probes.items():
                url = f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}"
                status, _ = await _wait_for(f"{name} {url}", lambda: _ok(session, url))
                assert status == 200
            _, metrics = await _wait_for("/metrics", lambda: _ok(session, f"http://127.0.0.1:{ports['metrics']}/metrics"))
            assert "ddetr_operator_jobs" in metrics

            # Namespaced mode (--namespace from watch.namespaces): a job there gets its worker Job.
            async with aiohttp.ClientSession(base_url=str(kmock.url)) as api:
                job = {"apiVersion": "ddetr.dev/v1alpha1", "kind": "DeformableDetrJob",
                       "metadata": {"name": "demo", "namespace": NAMESPACE, "uid": "uid-demo", "resourceVersion": "1",
                                    "creationTimestamp": "2026-01-01T00:00:00Z"},
                       "spec": {"image": "trainer:test", "nodes": 2, "gpusPerNode": 0,
                                "experiment": {"results_dir": "/results"}}}
                async with api.post(JOBS, json=job) as response:
                    assert response.status < 300, await response.text()

                async def worker_job():
                    status, text = await _get(api, f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/demo-a0")
                    return json.loads(text) if status == 200 else None
                worker = await _wait_for("the worker Job", worker_job)
                assert worker["spec"]["completions"] == 2
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode is not None, output[-3000:]


async def _ok(session, url: str):
    status, text = await _get(session, url)
    return (status, text) if status == 200 else None
