"""Fixtures of the cluster suite. With KUBECONFIG set, the suite runs against that cluster
(e.g. kind with the real images). Without it, the suite starts the local control plane
(localcluster/ddetr_localcluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK
and the pod runner, built from Go modules) for the session, and skips with the reason
where that cannot be had (no Go, no module proxy, not root)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

import e2e_manifests as m  # noqa: E402
from kube_target import CHART, Cluster, LocalTarget  # noqa: E402
from toolbox import find_tool  # noqa: E402

RELEASE = "ddetr"
OPERATOR_SA = "ddetr-operator"  # the chart's fullnameOverride in these tests: its ServiceAccount's name


def _external_cluster_problem(kubeconfig: str) -> str | None:
    missing = [p for p in kubeconfig.split(os.pathsep) if p and not Path(p).exists()]
    if missing:
        return f"KUBECONFIG names {', '.join(missing)}, which does not exist"
    for tool in ("kubectl", "helm"):
        if find_tool(tool) is None:
            return f"no {tool} binary (scripts/test-deps.d/helm.sh installs one)"
    try:
        probe = subprocess.run([find_tool("kubectl"), "get", "--raw", "/readyz", "--request-timeout=10s"],
                               capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "the cluster KUBECONFIG names did not answer within 20 s"
    if probe.returncode != 0:
        return f"the cluster KUBECONFIG names is not reachable: {probe.stderr.strip()[:200]}"
    return None


_local_cluster = None


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """The local control plane for this session (None when KUBECONFIG names a cluster)."""
    global _local_cluster
    if os.environ.get("KUBECONFIG"):
        yield None
        return
    from ddetr_localcluster.controlplane import LocalCluster, control_plane_bin
    if os.geteuid() != 0:
        pytest.skip("the local control plane's pod runner needs root (network namespaces); or set KUBECONFIG")
    if find_tool("helm") is None:
        pytest.skip("no helm binary (scripts/test-deps.d/helm.sh installs one)")
    bin_dir, reason = control_plane_bin()
    if bin_dir is None:
        pytest.skip(reason)
    cluster = LocalCluster(tmp_path_factory.mktemp("local-cluster"), bin_dir).start()
    _local_cluster = cluster
    try:
        yield cluster
    finally:
        _local_cluster = None
        cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the last lines of every component's log (and every operator's)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _local_cluster is not None:
        report.sections.append(("local cluster logs", _local_cluster.log_tails()))
        for log in sorted(_local_cluster.state.glob("operator-*.log")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-80:])
            report.sections.append((log.name, tail))


@pytest.fixture(scope="session")
def cluster(control_plane):
    namespace = f"ddetr-e2e-{uuid.uuid4().hex[:6]}"
    if control_plane is None:
        problem = _external_cluster_problem(os.environ["KUBECONFIG"])
        if problem:
            pytest.skip(problem)
        target = Cluster(namespace, find_tool("kubectl"), find_tool("helm"), os.environ["KUBECONFIG"])
    else:
        target = LocalTarget(namespace, control_plane, find_tool("helm"))
    target.kubectl("create", "namespace", namespace, namespaced=False)
    target.wait_until("the namespace's default ServiceAccount",
                      lambda: target.kubectl("get", "sa", "default", check=False).returncode == 0, 60, every=0.5)
    try:
        yield target
    finally:
        if target.local:
            target.stop_operators()
        if not os.environ.get("DDETR_E2E_KEEP"):
            target.kubectl("delete", "namespace", namespace, "--wait=false", namespaced=False, check=False)


def install_chart(cluster: Cluster, release: str, namespace: str, watch: list[str], *extra: str) -> None:
    args = ["upgrade", "--install", release, str(CHART), "--namespace", namespace,
            "--set", f"fullnameOverride={release}-operator", "--set", "operator.reconcileIntervalSeconds=3"]
    if watch:
        args += ["--set", "watch.namespaces={" + ",".join(watch) + "}"]
    if not cluster.local:
        repository, _, tag = m.OPERATOR_IMAGE.rpartition(":")
        args += ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
                 "--set", "trainer.allowedHostPaths={" + m.DATA_HOST_PATH + "}",
                 "--set", f"image.pullPolicy={m.PULL_POLICY}", "--wait", "--timeout", "5m"]
    cluster.helm(*args, *extra)


@pytest.fixture(scope="session")
def operator_release(cluster, tmp_path_factory) -> str:
    """The chart, installed into the test namespace and watching only it; on the local
    control plane its operator runs here as the chart's ServiceAccount."""
    install_chart(cluster, RELEASE, cluster.namespace, [cluster.namespace])
    # A chart installed earlier keeps its CRD (Helm never upgrades crds/): bring it up to date.
    crds = cluster.helm("show", "crds", str(CHART))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crds, namespaced=False)
    if cluster.local:
        # The suite's dataset is a hostPath under pytest's temporary folder: the one path allowed.
        allowed = str(tmp_path_factory.getbasetemp())
        cluster.start_operator(OPERATOR_SA, cluster.namespace, [cluster.namespace],
                               {"DDETR_ALLOWED_HOST_PATHS": allowed})
    return RELEASE


@pytest.fixture(scope="session")
def s3_store(cluster) -> str:
    if not cluster.local:
        cluster.apply(m.s3_store(cluster.namespace))
        cluster.kubectl("rollout", "status", f"deployment/{m.S3_SERVICE}", "--timeout=300s", timeout=330)
        assert "bucket ready" in cluster.run_python("make-bucket", m.MAKE_BUCKET)
        yield m.BUCKET
        return
    from moto.server import ThreadedMotoServer
    from kube_target import _free_port
    address, port = cluster.runner_address(), _free_port()
    server = ThreadedMotoServer(ip_address=address, port=port, verbose=False)
    server.start()
    cluster.s3_url = f"http://{address}:{port}"
    try:
        cluster.apply([m.credentials_secret(cluster.namespace)])
        assert "bucket ready" in cluster.run_python("make-bucket", m.MAKE_BUCKET)
        yield m.BUCKET
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dataset(cluster, tmp_path_factory) -> str:
    if not cluster.local:
        cluster.apply(m.dataset_daemonset(cluster.namespace))
        cluster.kubectl("rollout", "status", "daemonset/dataset", "--timeout=300s", timeout=330)
        return m.DATA_HOST_PATH
    folder = tmp_path_factory.mktemp("e2e-data")
    subprocess.run([sys.executable, str(m.DATASET_SCRIPT), str(folder)], check=True)
    cluster.data_dir = str(folder)
    return str(folder)


def job_status(cluster, name: str, namespace: str | None = None) -> dict:
    return cluster.get("deformabledetrjobs", name, namespace=namespace).get("status") or {}


def events_of(cluster, name: str, namespace: str | None = None) -> list[dict]:
    out = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json",
                          namespace=namespace)
    return json.loads(out)["items"]
