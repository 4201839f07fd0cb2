"""The controller: the jobs this operator serves (the table the watch keeps), one pass at a time per
job (a work queue folding triggers), the full-pass cadence, the periodic resync and leader election."""
from __future__ import annotations

import asyncio
import logging
import random
import time

from . import metrics, passes
from .children import is_older, resource_version
from .decide import wants_pass
from .kube import Cluster
from .leader import LeaseElector
from .options import Options

logger = logging.getLogger(__name__)


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
        # The same resourceVersion is the same object; where there is none to compare, the content decides.
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
        if body is not None:
            self.cluster.forget(body)

    def child_event(self, plural: str, event_type: str | None, child: dict, owner: tuple[str, str] | None) -> None:
        """A watch event of a child (a batch Job or Pod): index it, and run a pass of its owner at once."""
        if child:
            self.cluster.children.record(plural, event_type, child)
        if owner is not None:
            self.trigger(owner)

    def trigger(self, key: tuple[str, str], resync: bool = False) -> None:
        """Run a pass for the job soon, unless it has nothing to do (a finished job)."""
        job = self.jobs.get(key)
        if not self.leading or job is None or not wants_pass(job, passes.now(), resync):
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
            result = await asyncio.to_thread(passes.reconcile_once, self.cluster, key[0], key[1], self.options,
                                             cached=cached)
        except Exception:  # noqa: BLE001 - the next event or resync retries the job
            metrics.RECONCILE_ERRORS.inc()
            logger.exception("reconcile pass of %s/%s failed; retrying at the next event or resync", *key)
            self._full_due.pop(key, None)  # the retry is a full pass
            return
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        if isinstance(result, passes.PassResult):
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
