"""Kubernetes objects as the Job controller and kubelet would report them (for reconcile tests)."""
from __future__ import annotations

import socket


def pod(job_name: str, attempt: int, index: int, phase: str, exit_code: int | None = None,
        reason: str | None = None, message: str = "", finished_at: str | None = None,
        pod_reason: str | None = None) -> dict:
    """A worker pod as the Job controller creates it and kubelet reports it."""
    worker = f"{job_name}-a{attempt}"
    status: dict = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "message": message, "finishedAt": finished_at or "2026-01-02T03:00:00Z"}}}]
    elif phase == "Running":
        status["containerStatuses"] = [{"name": "trainer", "state": {"running": {"startedAt": "2026-01-02T02:00:00Z"}}}]
    if pod_reason:
        status["reason"], status["message"] = pod_reason, "The node was low on resource: memory."
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{worker}-{index}-x{index}", "namespace": "ml",
                         "labels": {"ddetr.dev/job-name": job_name, "ddetr.dev/attempt": str(attempt),
                                    "ddetr.dev/role": "worker", "job-name": worker,
                                    "batch.kubernetes.io/job-name": worker,
                                    "batch.kubernetes.io/job-completion-index": str(index)}},
            "status": status}


def worker_job(job_name: str, attempt: int, condition: str | None = None, suspend: bool = False,
               reason: str = "") -> dict:
    status: dict = {}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": reason, "message": reason}]
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"{job_name}-a{attempt}", "namespace": "ml",
                         "labels": {"ddetr.dev/job-name": job_name, "ddetr.dev/attempt": str(attempt)}},
            "spec": {"suspend": suspend}, "status": status}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def idle_cluster():
    """A Cluster built as the operator builds one, for tests whose passes never reach the API server."""
    from ddetr_operator.kube import Cluster
    return Cluster(api_client=None)
