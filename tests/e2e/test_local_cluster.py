"""The operator and the chart against a real API server with its controllers (the local
control plane; skipped on an external cluster, since KWOK's stages are what end the pods):
RBAC as the chart's ServiceAccount, admission (Pod Security, owner references), the API
server's own validation (schema, strict fields, CEL), the Job controller and the garbage
collector, exit codes and disruptions through KWOK, and operator restarts."""
from __future__ import annotations

import contextlib
import json
import signal
import time
import uuid

import pytest

import e2e_manifests as m
from conftest import OPERATOR_SA, events_of, install_chart, job_status

LABEL_JOB = "ddetr.dev/job-name"
INDEX = "batch.kubernetes.io/job-completion-index"
PHASE_TIMEOUT = 120


@pytest.fixture(scope="module")
def local(cluster, operator_release, s3_store):
    if not cluster.local:
        pytest.skip("needs the local control plane (KWOK's stages end the pods); runs when KUBECONFIG is unset")
    return cluster


def _pods(cluster, name: str, namespace: str | None = None, attempt: int | None = None) -> list[dict]:
    selector = f"{LABEL_JOB}={name}" + (f",ddetr.dev/attempt={attempt}" if attempt is not None else "")
    items = json.loads(cluster.kubectl("get", "pods", "-l", selector, "-o", "json", namespace=namespace))["items"]
    return sorted(items, key=lambda p: int(p["metadata"].get("annotations", {}).get(INDEX, "0")))


def _wait_phase(cluster, name: str, phase: str, namespace: str | None = None, timeout: float = PHASE_TIMEOUT):
    def reached():
        status = job_status(cluster, name, namespace)
        if status.get("phase") == "Failed" and phase != "Failed":
            raise AssertionError(f"{name} failed: {json.dumps(status.get('conditions'), indent=1)}")
        return status if status.get("phase") == phase else None
    return cluster.wait_until(f"{name} to be {phase}", reached, timeout, every=1)


def _running_pods(cluster, name: str, count: int, namespace: str | None = None, attempt: int | None = None):
    def running():
        pods = [p for p in _pods(cluster, name, namespace, attempt)
                if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
        return pods if len(pods) == count else None
    return cluster.wait_until(f"{count} running pod(s) of {name}", running, PHASE_TIMEOUT, every=1)


def _end_pod(cluster, pod: dict, *, code: int | None = None, message: str = "", disruption: str = "") -> None:
    annotations = [f"ddetr.dev/simulated-exit-code={code}"] if code is not None else []
    if message:
        annotations.append(f"ddetr.dev/simulated-message={message}")
    if disruption:
        annotations.append(f"ddetr.dev/simulated-disruption={disruption}")
    cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "--overwrite", *annotations,
                    namespace=pod["metadata"]["namespace"])


def _kwok_job(cluster, name: str, namespace: str | None = None, **spec) -> dict:
    return m.kwok_job(namespace or cluster.namespace, name, cluster.s3_endpoint(), **spec)


def _children(cluster, name: str, namespace: str | None = None) -> dict[str, list[str]]:
    out = {}
    for kind in ("jobs.batch", "pods", "services", "configmaps"):
        items = json.loads(cluster.kubectl("get", kind, "-l", f"{LABEL_JOB}={name}", "-o", "json",
                                           namespace=namespace))["items"]
        out[kind] = [i["metadata"]["name"] for i in items]
    return out


def _new_namespace(cluster, prefix: str, labels: dict[str, str] | None = None) -> str:
    namespace = f"{prefix}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", namespace, namespaced=False)
    if labels:
        cluster.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in labels.items()),
                        namespaced=False)
    cluster.wait_until(f"{namespace}'s default ServiceAccount",
                       lambda: cluster.kubectl("get", "sa", "default", check=False,
                                               namespace=namespace).returncode == 0, 60, every=0.5)
    cluster.apply([m.credentials_secret(namespace)], namespace=namespace)
    return namespace


def test_kwok_job_runs_to_succeeded_with_gang_and_status(local):
    cluster, name = local, "kwok-ok"
    cluster.apply([_kwok_job(cluster, name)])
    pods = _running_pods(cluster, name, 2)
    status = _wait_phase(cluster, name, "Running")
    assert status["workersReady"] == 2 and status["workerJob"] == f"{name}-a0"
    assert {p["spec"]["nodeName"] for p in pods} <= {"kwok-gpu-0", "kwok-gpu-1"}
    children = _children(cluster, name)
    assert children["jobs.batch"] == [f"{name}-a0"]
    assert f"{name}-workers" in children["services"] and f"{name}-spec" in children["configmaps"]
    job = cluster.get("deformabledetrjobs", name)
    assert not job["metadata"].get("finalizers"), "the operator must put no finalizer on jobs"
    for pod in pods:
        _end_pod(cluster, pod, code=0)
    status = _wait_phase(cluster, name, "Succeeded")
    assert status["restarts"] == 0 and status.get("completionTime")
    columns = cluster.kubectl("get", "ddj", name)
    assert "Succeeded" in columns.splitlines()[1]


def test_permanent_exit_code_fails_the_job_with_the_pods_message(local):
    cluster, name = local, "kwok-permanent"
    cluster.apply([_kwok_job(cluster, name)])
    pods = _running_pods(cluster, name, 2)
    _end_pod(cluster, pods[1], code=2, message="dataset.train_data_sources[0].json_file: not found")
    status = _wait_phase(cluster, name, "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ExitCode2"
    assert "json_file: not found" in failed["message"] and pods[1]["metadata"]["name"] in failed["message"]
    assert status["restarts"] == 0
    reasons = {e["reason"] for e in events_of(cluster, name)}
    assert "ExitCode2" in reasons


def test_retryable_exit_code_restarts_the_gang_as_a_new_attempt(local):
    cluster, name = local, "kwok-retry"
    cluster.apply([_kwok_job(cluster, name)])
    first = _running_pods(cluster, name, 2, attempt=0)
    _end_pod(cluster, first[0], code=200, message="lost a peer")
    second = _running_pods(cluster, name, 2, attempt=1)
    status = job_status(cluster, name)
    assert status["restarts"] == 1 and status["workerJob"] == f"{name}-a1"
    # Never two gangs at once: attempt 0's pods were gone before attempt 1's were created.
    assert not [p for p in _pods(cluster, name, attempt=0) if p["status"].get("phase") == "Running"]
    for pod in second:
        _end_pod(cluster, pod, code=0)
    status = _wait_phase(cluster, name, "Succeeded")
    assert status["restarts"] == 1


@pytest.mark.parametrize("change, refusal", [
    ({"nodes": "two"}, "spec.nodes"),                      # wrong type
    ({"nodes": 0}, "spec.nodes"),                          # out of range
    ({"nodez": 2}, 'unknown field "spec.nodez"'),          # strict field validation
    ({"runPolicy": {"cleanPodPolicy": "Sometimes"}}, "spec.runPolicy.cleanPodPolicy"),  # enum
])
def test_bad_manifests_are_refused_at_apply(local, change, refusal):
    job = _kwok_job(local, f"bad-{uuid.uuid4().hex[:5]}")
    job["spec"].update(change)
    result = local.kubectl("apply", "--validate=strict", "-f", "-", stdin=json.dumps(job), check=False)
    assert result.returncode != 0, f"the API server accepted {change}"
    assert refusal in result.stderr, result.stderr


def test_name_too_long_and_spec_changes_are_refused_by_cel_rules(local):
    cluster = local
    long_job = _kwok_job(cluster, "a" * 45)
    result = cluster.kubectl("apply", "-f", "-", stdin=json.dumps(long_job), check=False)
    assert result.returncode != 0 and "metadata.name" in result.stderr, result.stderr
    name = "kwok-immutable"
    job = _kwok_job(cluster, name, runPolicy={"suspend": True})
    cluster.apply([job])
    job["spec"]["image"] = "example.invalid/another:tag"
    result = cluster.kubectl("apply", "-f", "-", stdin=json.dumps(job), check=False)
    assert result.returncode != 0 and "immutable" in result.stderr, result.stderr
    cluster.kubectl("patch", "ddj", name, "--type=merge", "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
    cluster.kubectl("delete", "ddj", name, "--wait=true", timeout=60)


RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}


@contextlib.contextmanager
def namespace_with_operator(cluster, prefix: str, release: str, labels: dict[str, str] | None = None):
    """A fresh namespace with its own namespaced install of the chart and its operator running."""
    namespace = _new_namespace(cluster, prefix, labels)
    install_chart(cluster, release, namespace, [namespace])
    operator = cluster.start_operator(f"{release}-operator", namespace, [namespace])
    try:
        yield namespace
    finally:
        operator.stop()


def test_restricted_pod_security_namespace_admits_the_trainer_pods(local):
    cluster = local
    with namespace_with_operator(cluster, "restricted", "ddetr-rs", RESTRICTED) as namespace:
        name = "kwok-restricted"
        cluster.apply([_kwok_job(cluster, name, namespace=namespace)], namespace=namespace)
        pods = _running_pods(cluster, name, 2, namespace=namespace)
        for pod in pods:
            context = pod["spec"].get("securityContext") or {}
            assert context.get("runAsNonRoot") is True
        failed_create = [e for e in events_of(cluster, f"{name}-a0", namespace) if e["reason"] == "FailedCreate"]
        assert not failed_create, failed_create


def test_cluster_wide_install_runs_jobs_in_any_namespace(local):
    cluster = local
    home = _new_namespace(cluster, "operator-cw")
    elsewhere = _new_namespace(cluster, "team-a")
    install_chart(cluster, "ddetr-cw", home, [])
    # A cluster-wide install cannot know the teams' namespaces: their admin creates the
    # trainer ServiceAccount there (docs/kubernetes.md), as here.
    cluster.apply([{"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
                    "metadata": {"name": m.TRAINER_SERVICE_ACCOUNT, "namespace": elsewhere}}], namespace=elsewhere)
    operator = cluster.start_operator("ddetr-cw-operator", home, [])
    try:
        name = "kwok-anywhere"
        cluster.apply([_kwok_job(cluster, name, namespace=elsewhere)], namespace=elsewhere)
        for pod in _running_pods(cluster, name, 2, namespace=elsewhere):
            _end_pod(cluster, pod, code=0)
        _wait_phase(cluster, name, "Succeeded", namespace=elsewhere)
        assert "Forbidden" not in operator.tail(400), operator.tail()
    finally:
        operator.stop()


def test_deleting_a_running_job_collects_its_children_even_with_the_operator_down(local):
    cluster = local
    for name, operator_up in (("kwok-delete", True), ("kwok-delete-down", False)):
        cluster.apply([_kwok_job(cluster, name)])
        _running_pods(cluster, name, 2)
        _wait_phase(cluster, name, "Running")
        operator = cluster.operators[0]
        if not operator_up:
            operator.stop()
        try:
            cluster.kubectl("delete", "ddj", name, "--wait=true", "--timeout=60s", timeout=90)
            cluster.wait_until(f"the garbage collector to remove {name}'s children",
                               lambda: not any(_children(cluster, name).values()), 90, every=1)
        finally:
            if not operator_up:
                operator.start()


def test_operator_killed_and_restarted_mid_job_creates_nothing_twice(local):
    cluster, name = local, "kwok-operator-restart"
    cluster.apply([_kwok_job(cluster, name)])
    pods = _running_pods(cluster, name, 2)
    _wait_phase(cluster, name, "Running")
    operator = cluster.operators[0]
    operator.stop(signal.SIGKILL)
    operator.start()
    time.sleep(8)  # a few reconcile passes of the new process
    assert _children(cluster, name)["jobs.batch"] == [f"{name}-a0"]
    assert len(_pods(cluster, name)) == 2
    for pod in pods:
        _end_pod(cluster, pod, code=0)
    status = _wait_phase(cluster, name, "Succeeded")
    assert status["restarts"] == 0


def test_child_rejected_by_the_api_server_is_reported(local):
    cluster = local
    # Schema-valid, but the API server refuses it for a pod: a value with operator Exists.
    name = "kwok-bad-toleration"
    cluster.apply([_kwok_job(cluster, name, tolerations=[{"key": "gpu", "operator": "Exists", "value": "x"}])])

    def reported():
        status = job_status(cluster, name)
        text = json.dumps(status.get("conditions") or [])
        return status if "value must be empty" in text else None
    status = cluster.wait_until("the rejection in the job's status", reported, PHASE_TIMEOUT, every=1)
    assert status.get("phase") == "Failed"
    warnings = [e for e in events_of(cluster, name) if e["type"] == "Warning"]
    assert any("value must be empty" in e["message"] for e in warnings), warnings

    # A PodGroup whose CRD (Volcano's) is not installed: 404 from the API server.
    name = "kwok-no-podgroup-crd"
    cluster.apply([_kwok_job(cluster, name, gangScheduling={"scheduler": "volcano"})])

    def podgroup_reported():
        text = json.dumps(job_status(cluster, name).get("conditions") or [])
        return "PodGroup" in text and ("404" in text or "not found" in text.lower())
    cluster.wait_until("the missing PodGroup kind in the job's status", podgroup_reported, PHASE_TIMEOUT, every=1)
    assert any(e["type"] == "Warning" and "PodGroup" in e["message"] for e in events_of(cluster, name))


def test_operator_runs_without_admin_rights(local):
    """The session's operator authenticates with its ServiceAccount's token: the API server says who it is."""
    operator = local.operators[0]
    review = local.kubectl("--kubeconfig", str(operator.kubeconfig()), "auth", "whoami", "-o", "json",
                           namespaced=False)
    user = json.loads(review)["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{local.namespace}:{OPERATOR_SA}"
    assert "system:masters" not in user.get("groups", [])
