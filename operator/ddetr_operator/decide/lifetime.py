"""A finished job's lifetime: cleanPodPolicy, ttlSecondsAfterFinished, and whether a pass has work."""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

from ..api import run_policy_of
from .model import TERMINAL, DeleteSelf, DeleteWorkerJob, State, as_mapping, parse_time


def ttl_expired(job: Mapping[str, Any], now: dt.datetime) -> bool:
    """A finished job whose runPolicy.ttlSecondsAfterFinished has run out (it is to be deleted)."""
    ttl = run_policy_of(job).ttl_seconds_after_finished
    status = as_mapping(job.get("status"))
    if status.get("phase") not in TERMINAL or ttl is None:
        return False
    try:
        done = parse_time(status.get("completionTime"))
    except (TypeError, ValueError):
        return False
    return done is not None and now >= done + dt.timedelta(seconds=ttl)


def wants_pass(job: Mapping[str, Any], now: dt.datetime, resync: bool) -> bool:
    """Whether a reconcile pass has anything to do for `job` (as last seen on the watch).

    Active jobs always do (status, progress, deadlines, restarts). A finished job has work
    only when its TTL has run out, or, on an event (its own or a child's), when
    cleanPodPolicy All may still have a gang to delete: the periodic resync never lists a
    finished job's children again.
    """
    if as_mapping(job.get("status")).get("phase") not in TERMINAL:
        return True
    if ttl_expired(job, now):
        return True
    return run_policy_of(job).clean_pod_policy == "All" and not resync


def finished(s: State) -> None:
    """cleanPodPolicy applies here, once the job is finished, never to a failed attempt of a live job.

    All: every worker Job (and so every pod) goes. Running (the default) and None keep the Jobs
    and their finished pods for `kubectl logs`: after a failure the Job controller has already
    stopped the rest of the gang (backoffLimit 0), so no pod is left running.
    """
    if s.run_policy.clean_pod_policy == "All":
        for worker in s.observed.worker_jobs:
            s.actions.append(DeleteWorkerJob(worker["metadata"]["name"]))
    if ttl_expired(s.body, s.now):
        s.actions.append(DeleteSelf())
