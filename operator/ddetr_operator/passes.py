"""One pass for one job: a cached one (no request unless something changes) or a full one (fresh
reads, actions, status patch, events). What each costs and why: docs/architecture.md."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from typing import Any

from deformable_detr.tasks import DEFAULT_TASK

from . import metrics
from .api import run_policy_of
from .decide import CHILD_CREATE_FAILED, TERMINAL, Decision, DeleteSelf, Observed, reconcile, settle
from .decide.model import Heartbeat
from .decide.progress import FROM_STATUS_JSON
from .kube import Cluster, resolved
from .options import Options
from .progress import read_status_json, status_json_uri
from .validate import JobSpecError, effective_experiment

logger = logging.getLogger(__name__)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class JobMemory:
    """Values a pass keeps for the next passes of a job, under a lock. Cleared whole once it holds
    `limit` entries (jobs deleted without a last pass): forgetting costs a recomputation, or one
    deadline's delay for a heartbeat, never a wrong decision."""

    def __init__(self, limit: int = 10000):
        self._values: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, key, default=None):
        with self._lock:
            return self._values.get(key, default)

    def put(self, key, value) -> None:
        with self._lock:
            if len(self._values) >= self._limit and key not in self._values:
                self._values.clear()
            self._values[key] = value

    def forget(self, key) -> None:
        with self._lock:
            self._values.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


_UNKNOWN = object()
_URIS = JobMemory()  # (job uid, generation) -> its status.json, when on S3 (None: not on S3)


def _progress_uri(job: dict) -> str | None:
    """Where rank 0 writes status.json; kept per spec generation (the effective spec costs ms)."""
    meta = job["metadata"]
    key = (meta.get("uid"), meta.get("generation"))
    known = _URIS.get(key, _UNKNOWN)
    if known is not _UNKNOWN:
        return known
    uri = None
    typed = resolved(job)
    if typed is not None and typed.spec.task == DEFAULT_TASK:
        try:
            uri = status_json_uri(effective_experiment(typed.spec))
        except JobSpecError:
            uri = None
    uri = uri if uri and uri.startswith("s3://") else None
    _URIS.put(key, uri)
    return uri


def _read_progress(cluster: Cluster, job: dict, read_secrets: bool) -> dict | None:
    uri, typed = _progress_uri(job), resolved(job)
    if uri is None or typed is None:
        return None
    access = cluster.s3_access(job["metadata"]["namespace"], typed.spec.artifacts, read_secrets)
    return read_status_json(uri, access)


# Rank 0's heartbeat per job uid, as the last pass left it (decide/hangs.py). Memory only: after a
# restart or a leader change the next pass starts it again from the status (next_heartbeat).
_HEARTBEATS = JobMemory()  # job uid -> Heartbeat


def _heartbeat_of(job: dict) -> Heartbeat | None:
    return _HEARTBEATS.get(job["metadata"].get("uid"))


def _keep_heartbeat(job: dict, decision: Decision) -> None:
    uid = job["metadata"].get("uid")
    if decision.heartbeat is None or decision.status.get("phase") in TERMINAL:
        _HEARTBEATS.forget(uid)
    else:
        _HEARTBEATS.put(uid, decision.heartbeat)


def _gang_restarts(status: dict) -> int:
    """Restarts after failures and after disruptions (a Kueue suspend's new attempt is neither)."""
    return int(status.get("restarts") or 0) + int(status.get("disruptions") or 0)


@dataclasses.dataclass(frozen=True)
class PassResult:
    kind: str  # "cached": no request; "progress": one status patch; "full": fresh reads, actions, patch
    body: dict | None = None  # the job as the API server returned it during the pass (GET or patch)


_UNREAD = object()  # progress not read yet in this pass


def reconcile_once(cluster: Cluster, namespace: str, name: str, options: Options = Options(),
                   cached: dict | None = None) -> PassResult:
    """One pass for one job (blocking): from the cache when `cached` (the job's body as last seen)
    is given and suffices, else a full one."""
    progress: Any = _UNREAD
    if cached is not None:
        result, progress = _cached_pass(cluster, cached, options)
        if result is not None:
            return result
    return _full_pass(cluster, namespace, name, options, progress)


def _cached_pass(cluster: Cluster, job: dict, options: Options) -> tuple[PassResult | None, Any]:
    """A pass without reading the API server; (None, progress read) when it takes a full one."""
    old_status = job.get("status") or {}
    if old_status.get("phase") in TERMINAL:
        return None, _UNREAD  # passes of finished jobs are for the TTL or cleanPodPolicy All: rare, full
    observed = cluster.observe_cached(job)
    if observed is None:
        return None, _UNREAD
    progress: Any = _UNREAD
    if observed.worker_jobs:
        progress = observed.progress = _read_progress(cluster, job, options.read_secrets)
    observed.heartbeat = _heartbeat_of(job)
    decision = reconcile(job, observed, now(), options.policy)
    changed = {key for key, value in decision.status.items() if old_status.get(key) != value}
    if decision.actions or decision.events or not changed <= FROM_STATUS_JSON:
        return None, progress
    _keep_heartbeat(job, decision)
    metrics.phases.record(job["metadata"].get("uid"), decision.status.get("phase"))
    metrics.record_goodput(job["metadata"], decision.status.get("goodput"))
    if not changed:
        return PassResult("cached"), progress
    body = cluster.patch_status(job, {key: decision.status[key] for key in changed})
    return PassResult("progress", body), progress


def _full_pass(cluster: Cluster, namespace: str, name: str, options: Options, progress: Any) -> PassResult:
    job = cluster.get_job(namespace, name)
    if job is None:
        return PassResult("full")
    old_status = job.get("status") or {}
    phase = old_status.get("phase")
    clean_all = run_policy_of(job).clean_pod_policy == "All"
    # A finished job needs no look at its children, unless they are to be cleaned away.
    observed = cluster.observe(job) if phase not in TERMINAL or clean_all else Observed()
    if phase not in TERMINAL and observed.worker_jobs:
        observed.progress = (progress if progress is not _UNREAD
                             else _read_progress(cluster, job, options.read_secrets))
    observed.heartbeat = _heartbeat_of(job)
    at = now()
    decision = reconcile(job, observed, at, options.policy)
    _keep_heartbeat(job, decision)
    error = None
    for action in decision.actions:
        error = cluster.apply(job, action, observed)
        if error is not None:
            logger.warning("%s/%s: %s", namespace, name, error.describe())
            break  # the rest depends on it (a gang without its ConfigMap or PodGroup never starts)
    decision = settle(job, decision, error, at)
    deleted = error is None and any(isinstance(a, DeleteSelf) for a in decision.actions)
    changed = any(old_status.get(key) != value for key, value in decision.status.items())
    body = None if deleted else job
    if changed and not deleted:
        body = cluster.patch_status(job, decision.status)
    if _gang_restarts(decision.status) > _gang_restarts(old_status):
        metrics.RESTARTS.labels(namespace=namespace).inc()
    metrics.count_failure(namespace, old_status.get("lastFailure"), decision.status.get("lastFailure"))
    metrics.count_resize(namespace, old_status.get("lastResize"), decision.status.get("lastResize"))
    metrics.phases.record(job["metadata"]["uid"], decision.status.get("phase"))
    metrics.record_goodput(job["metadata"], decision.status.get("goodput"))
    for event in decision.events:
        if event.reason != CHILD_CREATE_FAILED:
            metrics.TRANSITIONS.labels(phase=decision.status.get("phase")).inc()
        cluster.post_event(job, event, at)
    return PassResult("full", body)
