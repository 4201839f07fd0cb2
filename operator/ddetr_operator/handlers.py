"""kopf handlers: thin glue between the watch streams and the pure functions.

No finalizer, ever. kopf puts one on every object that has a timer, a daemon or an
on.delete handler (nolar/kopf#1074), and then `kubectl delete ddj` and the deletion of a
namespace hang whenever the operator is down. So the operator uses only `kopf.on.event`
(which needs none) and keeps its own loop:

- `on.event` on DeformableDetrJob: remember the job (an in-memory table of the jobs this
  operator serves, the newest body seen: a watch event older than what a pass's own GET or
  status patch returned is dropped, and the echo of the operator's own write triggers
  nothing); run a pass; forget it on DELETED.
- `on.event` on the children it owns (batch/v1 Jobs and Pods labelled `ddetr.dev/job-name`):
  record the child in `kube.ChildIndex` (by owner; removed on DELETED) and run a pass of
  the owner, so a pod failure is acted on at once, not at the next resync.
- leader election (optional, `Options.leader_namespace`): replicas race for a
  coordination.k8s.io Lease (leader.py); all of them watch and remember jobs, only the
  holder runs passes, and a new holder runs one (a full one) for every job at once.
- a periodic resync, a background task started on startup and stopped on cleanup: every
  `interval` seconds a pass for each job not finished (progress, deadlines, a restart
  waiting for the old gang to be gone), and for finished jobs only when their TTL has run out.

Scale: what a pass costs. A running job must cost a bounded number of API requests a
minute, and a finished one none (they get no passes at all). So a pass comes in two kinds:

- a cached pass (most of them) reads nothing from the API server. The job is the table's
  body, its Jobs and Pods come from the index the watch keeps, its Service, ConfigMap,
  PodGroup and NetworkPolicy are taken as the last full pass saw (or created) them, and
  rank 0's progress is read from S3 (with the Secret's keys kept for a few minutes,
  `Options.secret_ttl`). `reconcile.reconcile` decides on that. When the decision is "nothing
  changes", that is the pass: no request. When only `status.progress`/`status.epochs` change,
  one status patch of just those fields (a stale body cannot hurt them: they come from S3).
  Anything else (an action, an event, any other status field) makes it a full pass, as does
  a job the cache cannot decide for (`Cluster.observe_cached`: no full pass yet, or a gang
  short of pods, whose FailedCreate events only a LIST shows).
- a full pass (`reconcile_once` without a cache) is the one that acts, as it always did:
  GET the job fresh (the status records restarts and attempts: a stale body must never make
  the operator reuse an attempt name or count a failure twice), LIST its Jobs and Pods (a
  quorum read: a gang is restarted only once every pod of the last attempt is gone, which a
  lagging watch might not show yet), GET the support children, `reconcile.reconcile`, apply
  the actions (a create answered 409 AlreadyExists counts as done), `reconcile.settle`, patch
  the status, post events. The LISTs also bring the index up to date (they drop what a watch
  that re-listed after a gap never reported deleted). Every job gets one at least every
  `Options.full_pass_every` seconds (randomised down to 80 %, so that jobs started together
  drift apart), whatever the cache says: a Service or ConfigMap a user deleted is recreated
  then at the latest (or at the next restart, which is a full pass). `full_pass_every` 0
  makes every pass a full one: the operator's behaviour before the cache, what
  bench/operator_scale.py compares with.

So a running job with nothing changing costs about one full pass (5 requests) per
`full_pass_every`, plus one status patch per progress change read from S3 (at most one per
`interval`), instead of 5-6 requests every `interval`; the watches are kopf's, one stream
per kind for all jobs.

A pass is blocking client code and runs in a worker thread. Passes for one job never
overlap: triggers that arrive during a pass fold into one more pass after it. A pass that
raises is counted and logged; the next trigger or resync retries it (a full one, if the
cache had been trusted).

Jobs that still carry kopf's old finalizer (`kopf.zalando.org/KopfFinalizerMarker`, from
the timer this operator used before) lose it on their first event: kopf removes
`settings.persistence.finalizer` from any object no handler needs it for, with a JSON
patch guarded by the resourceVersion.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import random
import socket
import threading
import time
from typing import Any

import kopf

from deformable_detr.tasks import DEFAULT_TASK

from . import GROUP, LABEL_JOB, PLURAL, VERSION, metrics
from .api import run_policy_of
from .kube import SECRET_TTL, Cluster, is_older, load_api_client, resource_version
from .leader import DEFAULT_LEASE_NAME, LeaseElector, Timing
from .progress import read_status_json, status_json_uri
from .decide import TERMINAL, DeleteSelf, Observed, reconcile, settle, wants_pass
from .kube import resolved
from .validate import JobSpecError, Policy, effective_experiment

DEFAULT_RECONCILE_INTERVAL = 10.0
DEFAULT_FULL_PASS_EVERY = 300.0
# Status fields a cached pass may patch on its own: they come from S3, not from the job or its children.
PROGRESS_FIELDS = frozenset({"progress", "epochs"})
# The finalizer kopf added while the operator used a timer. Kept as kopf's persistence finalizer so
# that kopf strips it from old jobs (it removes that one finalizer where no handler requires it).
LEGACY_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
    """The operator's configuration (command line / environment)."""

    interval: float = DEFAULT_RECONCILE_INTERVAL
    policy: Policy = Policy()
    read_secrets: bool = True  # read a job's credentials Secret to fetch its progress from S3
    # Seconds between full passes of a job (fresh GET and LISTs) when nothing happens; 0: every pass.
    full_pass_every: float = DEFAULT_FULL_PASS_EVERY
    secret_ttl: float = SECRET_TTL  # seconds the S3 keys read from a job's Secret are reused
    # Leader election: the namespace of the coordination.k8s.io Lease (None: off, this replica acts
    # alone), and this replica's identity in it.
    leader_namespace: str | None = None
    leader_identity: str = ""
    lease_name: str = DEFAULT_LEASE_NAME
    lease_timing: Timing = Timing()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


_URIS: dict[tuple[str, int], str | None] = {}  # (job uid, generation) -> its status.json, when on S3
_URIS_LOCK = threading.Lock()
MAX_URIS = 10000


def _progress_uri(job: dict) -> str | None:
    """Where rank 0 writes status.json; kept per spec generation (the effective spec costs ms)."""
    meta = job.get("metadata") or {}
    key = (meta.get("uid"), meta.get("generation"))
    cacheable = all(isinstance(part, (str, int)) for part in key)  # (KMock keeps neither)
    if cacheable:
        with _URIS_LOCK:
            if key in _URIS:
                return _URIS[key]
    uri = None
    typed = resolved(job)
    if typed is not None and typed.spec.task == DEFAULT_TASK:
        try:
            uri = status_json_uri(effective_experiment(typed.spec))
        except JobSpecError:
            uri = None
    uri = uri if uri and uri.startswith("s3://") else None
    if cacheable:
        with _URIS_LOCK:
            if len(_URIS) >= MAX_URIS:
                _URIS.clear()
            _URIS[key] = uri
    return uri


def _read_progress(cluster: Cluster, job: dict, read_secrets: bool) -> dict | None:
    uri = _progress_uri(job)
    if uri is None:
        return None
    artifacts = resolved(job).spec.artifacts  # (a status.json URI on S3 comes from artifacts.uri)
    access = cluster.s3_access(job["metadata"]["namespace"], artifacts, read_secrets)
    return read_status_json(uri, access)


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
    decision = reconcile(job, observed, _now(), options.policy)
    changed = {key for key, value in decision.status.items() if old_status.get(key) != value}
    if decision.actions or decision.events or not changed <= PROGRESS_FIELDS:
        return None, progress
    metrics.phases.record(job["metadata"].get("uid"), decision.status.get("phase"))
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
    now = _now()
    decision = reconcile(job, observed, now, options.policy)
    error = None
    for action in decision.actions:
        error = cluster.apply(job, action, observed)
        if error is not None:
            logger.warning("%s/%s: %s", namespace, name, error.describe())
            break  # the rest depends on it (a gang without its ConfigMap or PodGroup never starts)
    decision = settle(job, decision, error, now)
    deleted = error is None and any(isinstance(a, DeleteSelf) for a in decision.actions)
    changed = any(old_status.get(key) != value for key, value in decision.status.items())
    body = None if deleted else job
    if changed and not deleted:
        body = cluster.patch_status(job, decision.status)
    if _gang_restarts(decision.status) > _gang_restarts(old_status):
        metrics.RESTARTS.labels(namespace=namespace).inc()
    metrics.phases.record(job["metadata"]["uid"], decision.status.get("phase"))
    for event in decision.events:
        if event.reason != "ChildCreateFailed":
            metrics.TRANSITIONS.labels(phase=decision.status.get("phase")).inc()
        cluster.post_event(job, event, now)
    return PassResult("full", body)


class Controller:
    """The jobs this operator serves, and one pass at a time per job."""

    def __init__(self, cluster: Cluster, options: Options = Options()):
        self.cluster, self.options = cluster, options
        self.jobs: dict[tuple[str, str], dict] = {}  # (namespace, name) -> the job as last seen on the watch
        self._running: dict[tuple[str, str], asyncio.Task] = {}
        self._again: set[tuple[str, str]] = set()
        # (namespace, name) -> when (time.monotonic) the job's next pass must be a full one
        self._full_due: dict[tuple[str, str], float] = {}
        # Without leader election this replica always acts; with it, only while it holds the Lease.
        self.leading = options.leader_namespace is None

    def remember(self, body: dict) -> tuple[str, str]:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        self.jobs[key] = body
        return key

    def is_news(self, body: dict) -> bool:
        """Whether a watch event's body says more than the table: not older than the body a pass
        got from its GET or status patch, nor that very body (the echo of the operator's write)."""
        known = self.jobs.get((body["metadata"]["namespace"], body["metadata"]["name"]))
        if known is None:
            return True
        if is_older(body, known):
            return False
        # (The same resourceVersion is the same object on an API server; KMock never bumps it.)
        return not (resource_version(body) == resource_version(known) and body == known)

    def keep(self, key: tuple[str, str], body: dict | None) -> None:
        """The body a pass read or wrote, when newer than the table's (a later watch event may
        already be there; where the two cannot be compared, the watch alone keeps the table)."""
        known = self.jobs.get(key)
        if body is not None and known is not None and is_older(known, body):
            self.jobs[key] = body

    def forget(self, key: tuple[str, str]) -> None:
        body = self.jobs.pop(key, None)
        self._again.discard(key)
        self._full_due.pop(key, None)
        if body is not None and self.cluster is not None:
            self.cluster.forget(body)

    def trigger(self, key: tuple[str, str], resync: bool = False) -> None:
        """Run a pass for the job soon, unless it has nothing to do (a finished job)."""
        job = self.jobs.get(key)
        if not self.leading or job is None or not wants_pass(job, _now(), resync):
            return  # (a replica that is not the leader only remembers jobs, to act at once if it becomes one)
        if key in self._running:
            self._again.add(key)  # one more pass after the running one, however many triggers came
            return
        self._running[key] = asyncio.get_running_loop().create_task(self._passes(key))

    async def _passes(self, key: tuple[str, str]) -> None:
        try:
            while True:
                self._again.discard(key)
                await self._one_pass(key)
                if key not in self._again or key not in self.jobs:
                    return
        finally:
            self._running.pop(key, None)

    def _cached_body(self, key: tuple[str, str]) -> dict | None:
        """The body a cached pass may use, or None: time for a full pass."""
        every = self.options.full_pass_every
        if every <= 0 or time.monotonic() >= self._full_due.get(key, 0.0):
            return None
        return self.jobs.get(key)

    async def _one_pass(self, key: tuple[str, str]) -> None:
        started = time.monotonic()
        cached = self._cached_body(key)
        try:
            result = await asyncio.to_thread(reconcile_once, self.cluster, key[0], key[1], self.options,
                                             cached=cached)
        except Exception:  # noqa: BLE001 - the next event or resync retries the job
            metrics.RECONCILE_ERRORS.inc()
            logger.exception("reconcile pass of %s/%s failed; retrying at the next event or resync", *key)
            self._full_due.pop(key, None)  # the retry is a full pass
            return
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        if isinstance(result, PassResult):
            if result.kind == "full" and key in self.jobs:
                self._full_due[key] = time.monotonic() + self.options.full_pass_every * random.uniform(0.8, 1.0)
            self.keep(key, result.body)

    async def resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.interval)
            for key in list(self.jobs):
                self.trigger(key, resync=True)

    async def elect_forever(self, elector: LeaseElector) -> None:
        """Hold (or wait for) the Lease; on becoming the leader, a pass for every job at once."""
        while True:
            leading = await asyncio.to_thread(elector.try_once, time.monotonic())
            if leading != self.leading:
                logger.info("leader election: %s the Lease %s/%s as %s", "acquired" if leading else "lost",
                            elector.namespace, elector.name, elector.identity)
                self.leading = leading
                if leading:
                    self._full_due.clear()  # what this replica saw before is no base to act on
                    for key in list(self.jobs):
                        self.trigger(key, resync=True)
            await asyncio.sleep(elector.timing.renew_every)

    async def drain(self) -> None:
        """Wait for the passes in flight (on shutdown: none is cut off mid-way)."""
        running = list(self._running.values())
        if running:
            await asyncio.wait(running, timeout=30)


def _controller(memo: kopf.Memo) -> Controller:
    return memo.controller


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, options: Options) -> None:
    # Our resources are known in advance; no need to watch (and have RBAC for) all CRDs.
    settings.scanning.disabled = True
    settings.posting.reporting_component = "ddetr-operator"
    settings.watching.server_timeout = 300
    # No handler requires a finalizer, so kopf adds none; with this (its default) name it strips
    # the one an earlier version of this operator left on old jobs.
    settings.persistence.finalizer = LEGACY_FINALIZER
    memo.controller = Controller(Cluster(load_api_client(), secret_ttl=options.secret_ttl), options)
    port = getattr(memo, "metrics_port", None)
    if port is None:
        port = int(os.environ.get("DDETR_OPERATOR_METRICS_PORT", "8000"))
    if port:
        metrics.start_metrics_server(port)


async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    for attribute in ("resync_task", "elect_task"):
        task = getattr(memo, attribute, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    controller = getattr(memo, "controller", None)
    if controller is not None:
        await controller.drain()


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account in a cluster, else the kubeconfig (KUBECONFIG)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def jobs_known(**_: Any) -> int:
    """Liveness detail: how many jobs the operator tracks (the probe answers while kopf's loop lives)."""
    return metrics.phases.count()


async def on_job_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    controller = _controller(memo)
    raw = dict(event.get("object") or {}) or dict(body)
    key = (raw["metadata"]["namespace"], raw["metadata"]["name"])
    if event.get("type") == "DELETED":
        # Children go with the job through their ownerReferences; the operator only forgets it.
        controller.forget(key)
        metrics.phases.forget(raw["metadata"].get("uid"))
        return
    if not controller.is_news(raw):
        return  # the operator's own status patch coming back, or older than what a pass saw
    controller.remember(raw)
    controller.trigger(key)


def child_event_handler(plural: str):
    async def on_child_event(event: kopf.RawEvent, labels: kopf.Labels, namespace: str, memo: kopf.Memo,
                             **_: Any) -> None:
        controller = _controller(memo)
        child = event.get("object") or {}
        if controller.cluster is not None and child:
            controller.cluster.children.record(plural, event.get("type"), child)
        owner = labels.get(LABEL_JOB)
        if owner and namespace:
            controller.trigger((namespace, owner))
    return on_child_event


def register(registry: kopf.OperatorRegistry, interval: float | None = None,
             options: Options | None = None) -> kopf.OperatorRegistry:
    """Register the handlers: on.event only (no timers, daemons or on.delete: no finalizers)."""
    options = options or Options()
    if interval is not None:
        options = dataclasses.replace(options, interval=interval)

    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure(settings, memo, options)
        controller = _controller(memo)
        loop = asyncio.get_running_loop()
        memo.resync_task = loop.create_task(controller.resync_forever())
        if options.leader_namespace:
            elector = LeaseElector(controller.cluster.api_client, options.leader_namespace,
                                   options.leader_identity or f"{socket.gethostname()}-{os.getpid()}",
                                   options.lease_name, options.lease_timing)
            memo.elect_task = loop.create_task(controller.elect_forever(elector))

    kopf.on.startup(registry=registry, id="configure")(startup)
    kopf.on.cleanup(registry=registry)(stop_resync)
    kopf.on.login(registry=registry)(login)
    kopf.on.probe(id="jobs_known", registry=registry)(jobs_known)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(on_job_event)
    for group_version, plural in (("batch/v1", "jobs"), ("v1", "pods")):
        kopf.on.event(group_version, plural, labels={LABEL_JOB: kopf.PRESENT}, registry=registry,
                      id=f"owner_of_{plural}")(child_event_handler(plural))
    return registry
