"""Fixtures of the real-cluster suite: a reachable cluster (else skip, with the reason), the
chart installed into a fresh namespace, the in-cluster S3 store and the dataset."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

import e2e_manifests as m

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "deformable-detr-operator"
TOOLS_BIN = Path(os.environ.get("DDETR_TOOLS_DIR", Path.home() / ".cache" / "ddetr-tools")) / "bin"


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = TOOLS_BIN / name
    return str(candidate) if candidate.exists() else None


def _no_cluster_reason() -> str | None:
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig:
        return "KUBECONFIG is not set: the end-to-end suite needs a cluster (see docs/kubernetes.md)"
    missing = [p for p in kubeconfig.split(os.pathsep) if p and not Path(p).exists()]
    if missing:
        return f"KUBECONFIG names {', '.join(missing)}, which does not exist"
    for tool in ("kubectl", "helm"):
        if _tool(tool) is None:
            return f"no {tool} binary (scripts/test-deps.d/helm.sh installs one)"
    try:
        probe = subprocess.run([_tool("kubectl"), "get", "--raw", "/readyz", "--request-timeout=10s"],
                               capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "the cluster KUBECONFIG names did not answer within 20 s"
    if probe.returncode != 0:
        return f"the cluster KUBECONFIG names is not reachable: {probe.stderr.strip()[:200]}"
    return None


class Cluster:
    """kubectl and helm against the cluster KUBECONFIG names, in one test namespace."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.kubectl_path = _tool("kubectl")
        self.helm_path = _tool("helm")

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120,
                namespaced: bool = True) -> str:
        command = [self.kubectl_path, *(["--namespace", self.namespace] if namespaced else []), *args]
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def helm(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run([self.helm_path, *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def apply(self, manifests: list[dict]) -> None:
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", kind, name, "-o", "json"))

    def wait_until(self, what: str, condition: Callable[[], Any], timeout: float, every: float = 3.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    def run_python(self, name: str, code: str, timeout: float = 300) -> str:
        """Run `code` in a one-shot Job (trainer image, S3 credentials) and return its output."""
        self.apply([m.helper_job(self.namespace, name, code)])
        self.kubectl("wait", "--for=condition=complete", f"job/{name}", f"--timeout={int(timeout)}s",
                     timeout=timeout + 30)
        return self.kubectl("logs", f"job/{name}")

    def port_forward(self, target: str, port: int) -> tuple[subprocess.Popen, int]:
        """`kubectl port-forward target :port`; returns the process and the local port."""
        process = subprocess.Popen([self.kubectl_path, "--namespace", self.namespace, "port-forward", target,
                                    f":{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = process.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match:
            process.terminate()
            raise AssertionError(f"port-forward {target}: {line or process.stderr.read()}")
        return process, int(match.group(1))


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    reason = _no_cluster_reason()
    if reason:
        pytest.skip(reason)
    namespace = f"ddetr-e2e-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(namespace)
    cluster.kubectl("create", "namespace", namespace, namespaced=False)
    try:
        yield cluster
    finally:
        if not os.environ.get("DDETR_E2E_KEEP"):
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", namespaced=False, check=False)


@pytest.fixture(scope="session")
def operator_release(cluster: Cluster) -> str:
    """The chart, installed into the test namespace and watching only it."""
    repository, _, tag = m.OPERATOR_IMAGE.rpartition(":")
    release = "ddetr"
    cluster.helm("upgrade", "--install", release, str(CHART), "--namespace", cluster.namespace,
                 "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
                 "--set", f"image.pullPolicy={m.PULL_POLICY}",
                 "--set", f"watch.namespaces={{{cluster.namespace}}}",
                 "--set", "operator.reconcileIntervalSeconds=3",
                 "--wait", "--timeout", "5m")
    # A chart installed earlier keeps its CRD (Helm never upgrades crds/): bring it up to date.
    crds = cluster.helm("show", "crds", str(CHART))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crds, namespaced=False)
    return release


@pytest.fixture(scope="session")
def s3_store(cluster: Cluster) -> str:
    cluster.apply(m.s3_store(cluster.namespace))
    cluster.kubectl("rollout", "status", f"deployment/{m.S3_SERVICE}", "--timeout=300s", timeout=330)
    assert "bucket ready" in cluster.run_python("make-bucket", m.MAKE_BUCKET)
    return m.BUCKET


@pytest.fixture(scope="session")
def dataset(cluster: Cluster) -> str:
    cluster.apply(m.dataset_daemonset(cluster.namespace))
    cluster.kubectl("rollout", "status", "daemonset/dataset", "--timeout=300s", timeout=330)
    return m.DATA_HOST_PATH
