"""Deadlines: runPolicy.activeDeadlineSeconds (from the job's start) and startupDeadlineSeconds (an
attempt's gang all running within this after its Job started); why a gang cannot start (Stalled)."""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping, Sequence

from .attempts import tear_down
from .conditions import STALLED, condition, transition
from .model import State, parse_time

# Container waiting reasons that keep a gang from starting whatever time passes, until someone acts.
BLOCKING_WAIT_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                         "CreateContainerError", "ErrImageNeverPull")


def deadline_exceeded(s: State, worker: dict | None) -> bool:
    deadline = s.run_policy.active_deadline_seconds
    started = parse_time(s.status.get("startTime"))
    if deadline is None or started is None or s.status.get("phase") == "Suspended":
        return False
    if s.now < started + dt.timedelta(seconds=deadline):
        return startup_deadline_exceeded(s, worker)
    tear_down(s)
    transition(s, "Failed", "DeadlineExceeded", f"the job ran longer than activeDeadlineSeconds ({deadline})")
    return True


def startup_deadline_exceeded(s: State, worker: dict | None) -> bool:
    """runPolicy.startupDeadlineSeconds: the attempt's gang must be all running within this."""
    limit = s.run_policy.startup_deadline_seconds
    if not limit or worker is None or (worker.get("spec") or {}).get("suspend") or s.status.get("phase") == "Running":
        return False
    since = parse_time((worker.get("status") or {}).get("startTime")) or \
        parse_time(worker["metadata"].get("creationTimestamp"))
    if since is None or s.now < since + dt.timedelta(seconds=limit):
        return False
    blocked = condition(s, STALLED, true_only=True)
    why = f"; {blocked['reason']}: {blocked['message']}" if blocked else ""
    tear_down(s)
    transition(s, "Failed", "StartupDeadlineExceeded",
               f"the gang of {worker['metadata']['name']} was not all running within "
               f"runPolicy.startupDeadlineSeconds ({limit}){why}")
    return True


def blocker(pods: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]],
            nodes: int) -> tuple[str, str] | None:
    """Why the gang's pods do not run, in words a user can act on: (reason, message), or None.

    A pod the scheduler cannot place (PodScheduled False, Unschedulable), a container kubelet
    cannot start (image pull, a missing Secret or key: CreateContainerConfigError), or pods the
    Job controller could not create (FailedCreate events: Pod Security, quota, a webhook).
    """
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        for container in status.get("containerStatuses") or status.get("initContainerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in BLOCKING_WAIT_REASONS:
                return waiting["reason"], f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}".strip()
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == "Unschedulable":
                return "Unschedulable", f"pod {name} cannot be scheduled: {cond.get('message', '')}"
    if len(pods) < nodes:
        failed_create = [e for e in events if e.get("reason") == "FailedCreate"]
        if failed_create:
            newest = max(failed_create, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            return "FailedCreate", f"{len(pods)}/{nodes} pod(s) created: {newest.get('message', '')}"
    return None
