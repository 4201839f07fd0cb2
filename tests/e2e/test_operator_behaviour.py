"""Issue 16's operator behaviours against the local control plane (real API server, Job
controller, scheduler, Pod Security admission; KWOK ends the pods): failed attempts keep
their logs, disruptions are counted apart, readable reasons for gangs that cannot start,
the start-up deadline, the NetworkPolicy and pod template, and every example accepted."""
from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import signal

import pytest
import yaml

import e2e_manifests as m
from conftest import REPO, events_of, install_chart, job_status
from ddetr_localcluster.controlplane import kwok_node
from test_local_cluster import (PHASE_TIMEOUT, RESTRICTED, _children, _end_pod, _kwok_job, _new_namespace, _pods,
                                _running_pods, _wait_phase, local, namespace_with_operator)  # noqa: F401 - `local` is the module fixture

from ddetr_operator import render
from ddetr_operator.api import resolve
from ddetr_operator.validate import validate_job


def _condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def _wait_condition(cluster, name: str, type_: str, reason: str, namespace: str | None = None) -> dict:
    def seen():
        status = job_status(cluster, name, namespace)
        cond = _condition(status, type_)
        return status if cond.get("status") == "True" and cond.get("reason") == reason else None
    return cluster.wait_until(f"{name}: condition {type_} with reason {reason}", seen, PHASE_TIMEOUT, every=1)


def test_a_failed_job_keeps_the_failed_attempts_job_and_pods_and_names_the_rank(local):
    cluster, name = local, "kwok-keep-logs"
    cluster.apply([_kwok_job(cluster, name)])
    pods = _running_pods(cluster, name, 2)
    _end_pod(cluster, pods[1], code=2, message="spec.dataset: bad")
    status = _wait_phase(cluster, name, "Failed")
    assert status["lastFailure"]["rank"] == 1 and status["lastFailure"]["exitCode"] == 2
    assert status["lastFailure"]["pod"] == pods[1]["metadata"]["name"]
    assert status["attempts"][-1]["outcome"] == "Failed"
    # The Job controller stopped rank 0; the Job and the failed pod (its logs) stay.
    cluster.wait_until("rank 0 stopped", lambda: all(p["status"].get("phase") in ("Failed", "Succeeded")
                                                     for p in _pods(cluster, name)), 60, every=1)
    assert _children(cluster, name)["jobs.batch"] == [f"{name}-a0"]
    failed = [p for p in _pods(cluster, name) if p["metadata"]["name"] == pods[1]["metadata"]["name"]]
    assert failed and failed[0]["status"]["phase"] == "Failed"


def test_a_disruption_is_counted_apart_and_the_next_gang_waits_for_the_old(local):
    cluster, name = local, "kwok-disrupt-count"
    cluster.apply([_kwok_job(cluster, name, runPolicy={"backoffLimit": 0})])
    first = _running_pods(cluster, name, 2, attempt=0)
    _end_pod(cluster, first[0], disruption="PreemptionByScheduler")
    second = _running_pods(cluster, name, 2, attempt=1)
    # No overlap: every pod of attempt 0 had finished before attempt 1's pods were created.
    old = _pods(cluster, name, attempt=0)
    assert all(p["status"].get("phase") in ("Failed", "Succeeded") for p in old)
    created = min(p["metadata"]["creationTimestamp"] for p in second)
    for pod in old:
        finished = [s["state"]["terminated"]["finishedAt"] for s in pod["status"].get("containerStatuses") or []
                    if "terminated" in s.get("state", {})]
        assert all(f <= created for f in finished), (pod["metadata"]["name"], finished, created)
    status = job_status(cluster, name)
    # Preemptions do not use up the backoff limit (0 here): the gang came back, counted apart.
    assert status["phase"] in ("Pending", "Running", "Restarting")
    assert status["restarts"] == 0 and status["disruptions"] == 1 and status["attempt"] == 1
    assert status["lastFailure"]["reason"] == "PreemptionByScheduler"
    assert status["lastFailure"]["pod"] == first[0]["metadata"]["name"]
    assert status["attempts"][0]["outcome"] == "Disrupted"
    header, row = cluster.kubectl("get", "ddj", name).splitlines()[:2]
    start = header.index("DISRUPTIONS")  # (an empty cell, mAP here, leaves no word: read by position)
    assert row[start:].split()[0] == "1", (header, row)
    assert f"{name}-a0" in _children(cluster, name)["jobs.batch"]  # the disrupted attempt's Job is kept
    for pod in second:
        _end_pod(cluster, pod, code=0)
    _wait_phase(cluster, name, "Succeeded")


def test_an_unschedulable_gang_is_reported_and_the_startup_deadline_fails_it(local):
    cluster, name = local, "kwok-unschedulable"
    job = _kwok_job(cluster, name, runPolicy={"startupDeadlineSeconds": 20})
    job["spec"]["nodeSelector"] = {**job["spec"]["nodeSelector"], "ddetr.dev/no-such-node": "true"}
    cluster.apply([job])
    status = _wait_condition(cluster, name, "Stalled", "Unschedulable")
    assert "cannot be scheduled" in _condition(status, "Stalled")["message"]
    assert any(e["type"] == "Warning" and e["reason"] == "Unschedulable" for e in events_of(cluster, name))
    status = _wait_phase(cluster, name, "Failed")
    failed = _condition(status, "Failed")
    assert failed["reason"] == "StartupDeadlineExceeded" and "Unschedulable" in failed["message"]


def _bound(pods: list[dict]) -> list[str]:
    return sorted(p["metadata"]["name"] for p in pods if p["spec"].get("nodeName"))


GANG_POOL = {"ddetr.dev/test-pool": "gang"}  # two KWOK nodes of their own: other tests' pods hold GPUs elsewhere
GANG_POOL_TAINT = {"key": "ddetr.dev/test-pool", "value": "gang", "effect": "NoSchedule"}


@contextlib.contextmanager
def _gang_pool(cluster, count: int = 2):
    names = [f"kwok-gang-{i}" for i in range(count)]
    for name in names:
        node = kwok_node(name)
        node["metadata"]["labels"].update(GANG_POOL)
        cluster.apply([node], namespace=None)
        # (replaces the API server's not-ready taint, which no node-lifecycle controller lifts here)
        cluster.kubectl("patch", "node", name, "--type=merge", "-p",
                        json.dumps({"spec": {"taints": [GANG_POOL_TAINT]}}), namespaced=False)
    try:
        yield names
    finally:
        cluster.kubectl("delete", "node", *names, "--ignore-not-found", "--wait=false", namespaced=False)


def test_kubernetes_gang_scheduling_binds_the_whole_gang_or_nothing(local):
    """Kubernetes' own gang scheduling (scheduling.k8s.io/v1beta1 PodGroup, the scheduler's
    GangScheduling plugin), against the same job without it in the same cluster: with one GPU of
    a two-node pool's 16 taken, a 2 x 8-GPU gang cannot fit; without a gang one rank binds and holds
    8 GPUs for a rendezvous that never comes, with it no rank binds until both fit."""
    cluster = local
    served = cluster.kubectl("api-resources", "--api-group=scheduling.k8s.io", "-o", "name", namespaced=False)
    assert "podgroups.scheduling.k8s.io" in served.split(), served
    placement = {"nodeSelector": {**m.KWOK_NODE_SELECTOR, **GANG_POOL},
                 "tolerations": [{**GANG_POOL_TAINT, "operator": "Equal"}], "gpusPerNode": 8}
    with _gang_pool(cluster) as (first_node, _):
        blocker = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu-blocker"},
                   "spec": {"nodeName": first_node, "tolerations": [{**GANG_POOL_TAINT, "operator": "Equal"}],
                            "containers": [{"name": "c", "image": "example.invalid/blocker",
                                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
        cluster.apply([blocker])
        try:
            cluster.wait_until("the blocker running", lambda: cluster.get("pod", "gpu-blocker")["status"].get(
                "phase") == "Running", PHASE_TIMEOUT, every=1)
            # The reference: no gang scheduling, one rank binds.
            plain = "kwok-no-gang"
            cluster.apply([_kwok_job(cluster, plain, **placement)])
            _wait_condition(cluster, plain, "Stalled", "Unschedulable")
            # (the scheduler may report the second rank unschedulable before it has bound the first)
            cluster.wait_until(f"one rank of {plain} bound", lambda: len(_bound(_pods(cluster, plain))) == 1,
                               PHASE_TIMEOUT, every=1)
            cluster.kubectl("delete", "ddj", plain, "--wait=true")
            cluster.wait_until(f"{plain}'s pods gone", lambda: not _pods(cluster, plain), PHASE_TIMEOUT, every=1)

            name = "kwok-k8s-gang"
            cluster.apply([_kwok_job(cluster, name, gangScheduling={"scheduler": "kubernetes"}, **placement)])
            status = _wait_condition(cluster, name, "Stalled", "Unschedulable")
            message = _condition(status, "Stalled")["message"]
            assert "minCount (2)" in message or "nvidia.com/gpu" in message, message
            pods = _pods(cluster, name)
            assert len(pods) == 2 and _bound(pods) == [], [p["spec"].get("nodeName") for p in pods]
            assert all(p["spec"]["schedulingGroup"] == {"podGroupName": name} for p in pods)
            group = cluster.get("podgroups.scheduling.k8s.io", name)
            assert group["spec"]["schedulingPolicy"] == {"gang": {"minCount": 2}}
            assert group["metadata"]["ownerReferences"][0]["name"] == name

            cluster.kubectl("delete", "pod", "gpu-blocker", "--grace-period=0", "--force")
            pods = _running_pods(cluster, name, 2)
            assert {p["spec"]["nodeName"] for p in pods} == {"kwok-gang-0", "kwok-gang-1"}
            for pod in pods:
                _end_pod(cluster, pod, code=0)
            _wait_phase(cluster, name, "Succeeded")
            # The PodGroup goes with its job (the API server's PodGroupProtection finalizer is lifted).
            cluster.kubectl("delete", "ddj", name, "--wait=true")
            cluster.wait_until(f"{name}'s PodGroup gone", lambda: cluster.kubectl(
                "get", "podgroups.scheduling.k8s.io", name, check=False).returncode != 0, PHASE_TIMEOUT, every=1)
        finally:
            cluster.kubectl("delete", "pod", "gpu-blocker", "--ignore-not-found", "--grace-period=0", "--force")


def test_a_pod_security_rejection_is_reported(local):
    cluster = local
    with namespace_with_operator(cluster, "baseline", "ddetr-ps", RESTRICTED) as namespace:
        name = "kwok-host-network"
        cluster.apply([_kwok_job(cluster, name, namespace=namespace, podTemplate={"spec": {"hostNetwork": True}})],
                      namespace=namespace)
        status = _wait_condition(cluster, name, "Stalled", "FailedCreate", namespace)
        message = _condition(status, "Stalled")["message"]
        assert "PodSecurity" in message and "host namespaces" in message, message
        assert any(e["reason"] == "FailedCreate" and e["type"] == "Warning"
                   for e in events_of(cluster, name, namespace))


def test_network_policy_and_pod_template_are_accepted(local):
    cluster, name = local, "kwok-netpol"
    cluster.apply([_kwok_job(cluster, name, networkPolicy=True,
                             podTemplate={"metadata": {"annotations": {"k8s.v1.cni.cncf.io/networks": "roce"}}})])
    pods = _running_pods(cluster, name, 2)
    assert all(p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "roce" for p in pods)
    policy = cluster.get("networkpolicy", f"{name}-gang")
    assert policy["spec"]["podSelector"]["matchLabels"]["ddetr.dev/job-name"] == name
    for pod in pods:
        _end_pod(cluster, pod, code=0)
    _wait_phase(cluster, name, "Succeeded")


EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_and_its_children_are_accepted_by_the_api_server(local, path):
    """Server-side dry run: the CRD's schema and CEL rules, then each rendered child (Job, Service,
    ConfigMap, NetworkPolicy) through the API server's own validation and admission."""
    cluster = local
    with open(path, encoding="utf-8") as fh:
        documents = [d for d in yaml.safe_load_all(fh) if d]
    for document in documents:
        document = copy.deepcopy(document)
        document["metadata"]["namespace"] = cluster.namespace
        cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(document))
        if document.get("kind") != "DeformableDetrJob":
            continue
        document["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
        experiment = validate_job(document["metadata"]["name"], document["spec"])
        children = [render.render_service(resolve(document)), render.render_configmap(resolve(document), experiment),
                    render.render_worker_job(resolve(document), 0)]
        for child in children:
            child["metadata"].pop("ownerReferences")  # the owner does not exist (a dry run)
            cluster.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(child))


def _passes(operator) -> float:
    from kube_target import _get
    text = _get(f"http://127.0.0.1:{operator.metrics_port}/metrics")
    line = next(l for l in text.splitlines() if l.startswith("ddetr_operator_reconcile_duration_seconds_count"))
    return float(line.split()[-1])


def test_two_replicas_elect_one_leader_and_the_other_takes_over(local):
    cluster = local
    namespace = _new_namespace(cluster, "leader")
    install_chart(cluster, "ddetr-le", namespace, [namespace], "--set", "operator.replicas=2")
    operators = [cluster.start_operator("ddetr-le-operator", namespace, [namespace],
                                        {"DDETR_LEADER_ELECTION_NAMESPACE": namespace,
                                         "DDETR_LEADER_ELECTION_ID": identity}) for identity in ("first", "second")]
    try:
        holder = cluster.wait_until("a leader", lambda: _lease(cluster, namespace), 60, every=1)
        leader, follower = (operators if holder == "first" else operators[::-1])
        name = "kwok-two-replicas"
        cluster.apply([_kwok_job(cluster, name, namespace=namespace)], namespace=namespace)
        pods = _running_pods(cluster, name, 2, namespace=namespace)
        _wait_phase(cluster, name, "Running", namespace=namespace)
        assert _children(cluster, name, namespace)["jobs.batch"] == [f"{name}-a0"]
        assert _passes(leader) > 0 and _passes(follower) == 0  # one writer
        leader.stop(signal.SIGKILL)
        for pod in pods:
            _end_pod(cluster, pod, code=0)
        _wait_phase(cluster, name, "Succeeded", namespace=namespace)  # only the follower is left to see it
        assert _passes(follower) > 0
        assert _lease(cluster, namespace) == ("second" if holder == "first" else "first")
        assert _children(cluster, name, namespace)["jobs.batch"] == [f"{name}-a0"]
    finally:
        for operator in operators:
            operator.stop()


def _lease(cluster, namespace: str) -> str | None:
    found = cluster.kubectl("get", "lease", "ddetr-operator-leader", "-o", "json", namespace=namespace, check=False)
    if found.returncode != 0:
        return None
    return json.loads(found.stdout)["spec"].get("holderIdentity")
