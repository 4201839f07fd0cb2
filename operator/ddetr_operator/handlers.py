"""kopf handlers: thin glue between the watch stream and the pure functions.

A single timer per DeformableDetrJob runs one level-triggered reconcile pass every
`interval` seconds (default 10): read the job fresh, observe its
children, `reconcile.reconcile`, apply the actions, patch the status subresource, post
events. Reading the job fresh (not the timer's cached body) means a pass always sees
the status the previous pass wrote.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import time
from typing import Any

import kopf

from . import GROUP, PLURAL, VERSION, metrics
from .kube import Cluster, load_api_client
from .progress import read_status_json, status_json_uri
from .reconcile import TERMINAL, DeleteSelf, Observed, reconcile
from .validate import JobSpecError, effective_experiment

DEFAULT_RECONCILE_INTERVAL = 10.0
logger = logging.getLogger(__name__)


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our resources are known in advance; no need to watch (and have RBAC for) all CRDs.
    settings.scanning.disabled = True
    settings.posting.reporting_component = "ddetr-operator"
    settings.watching.server_timeout = 300
    memo.cluster = Cluster(load_api_client())
    port = getattr(memo, "metrics_port", None)
    if port is None:
        port = int(os.environ.get("DDETR_OPERATOR_METRICS_PORT", "8000"))
    if port:
        metrics.start_metrics_server(port)


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account in a cluster, else the kubeconfig (KUBECONFIG)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def jobs_known(**_: Any) -> int:
    """Liveness detail: how many jobs the operator tracks (the probe answers while kopf's loop lives)."""
    return metrics.phases.count()


def _read_progress(cluster: Cluster, job: dict) -> dict | None:
    spec = job.get("spec") or {}
    if (spec.get("task") or "train") != "train":
        return None
    try:
        uri = status_json_uri(effective_experiment(spec))
    except JobSpecError:
        return None
    if not uri.startswith("s3://"):
        return None
    return read_status_json(uri, cluster.s3_access(job["metadata"]["namespace"], spec.get("artifacts") or {}))


def reconcile_once(cluster: Cluster, namespace: str, name: str, body: kopf.Body | None = None) -> None:
    """One pass for one job."""
    job = cluster.get_job(namespace, name)
    if job is None:
        return
    old_status = job.get("status") or {}
    phase = old_status.get("phase")
    clean_all = ((job.get("spec") or {}).get("runPolicy") or {}).get("cleanPodPolicy") == "All"
    # A finished job needs no look at its children, unless they are to be cleaned away.
    observed = cluster.observe(job) if phase not in TERMINAL or clean_all else Observed()
    if phase not in TERMINAL and observed.worker_jobs:
        observed.progress = _read_progress(cluster, job)
    decision = reconcile(job, observed, dt.datetime.now(dt.timezone.utc))
    for action in decision.actions:
        cluster.apply(job, action, observed)
    changed = any(old_status.get(key) != value for key, value in decision.status.items())
    if changed and not any(isinstance(a, DeleteSelf) for a in decision.actions):
        cluster.patch_status(job, decision.status)
    if decision.status.get("restarts", 0) > old_status.get("restarts", 0):
        metrics.RESTARTS.labels(namespace=namespace).inc()
    metrics.phases.record(job["metadata"]["uid"], decision.status.get("phase"))
    target = body if body is not None else job
    for event in decision.events:
        metrics.TRANSITIONS.labels(phase=decision.status.get("phase")).inc()
        kopf.event(target, type=event.type, reason=event.reason, message=event.message)


def reconcile_job(name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    started = time.monotonic()
    try:
        reconcile_once(memo.cluster, namespace, name, body)
    except Exception:
        metrics.RECONCILE_ERRORS.inc()
        raise  # kopf logs it and retries after the backoff
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


def forget_deleted_job(event: kopf.RawEvent, uid: str, **_: Any) -> None:
    # No finalizer: children go with the job through their ownerReferences; only metrics forget it.
    if event.get("type") == "DELETED":
        metrics.phases.forget(uid)


def register(registry: kopf.OperatorRegistry, interval: float = DEFAULT_RECONCILE_INTERVAL) -> kopf.OperatorRegistry:
    """Register the handlers (the timer interval is fixed here, hence a function, not decorators)."""
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(login)
    kopf.on.probe(id="jobs_known", registry=registry)(jobs_known)
    kopf.timer(GROUP, VERSION, PLURAL, interval=interval, backoff=interval, registry=registry)(reconcile_job)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(forget_deleted_job)
    return registry
