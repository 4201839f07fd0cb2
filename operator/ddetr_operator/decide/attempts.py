"""Attempts: which one is current (the one rule, read by kube.py too), its Job and pods, its history,
and the worker Jobs of earlier attempts to stop or keep."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .. import LABEL_ATTEMPT
from ..api import MAX_ATTEMPT_HISTORY
from ..render import worker_job_name
from .model import TERMINAL, DeleteWorkerJob, State, timestamp

# Failed attempts whose worker Jobs (and so their pods and `kubectl logs`) are kept besides the current one.
KEEP_FAILED_ATTEMPTS = 3


def attempt_of(obj: Mapping[str, Any]) -> int | None:
    value = (obj["metadata"].get("labels") or {}).get(LABEL_ATTEMPT)
    return int(value) if value is not None and str(value).isdigit() else None


def current_attempt(status: Mapping[str, Any], children: Iterable[Mapping[str, Any]] = ()) -> int:
    """The status's attempt (from an older operator's status: its restarts), never below the highest
    attempt label among `children`: a status lost between creating attempt n's Job and recording it
    cannot make a later pass reuse a name."""
    seen = [a for a in (attempt_of(o) for o in children) if a is not None]
    return max([int(status.get("attempt", status.get("restarts", 0)) or 0), *seen])


def current_worker_job(s: State) -> dict | None:
    name = worker_job_name(s.name, s.attempt)
    return next((j for j in s.observed.worker_jobs if j["metadata"]["name"] == name), None)


def current_pods(s: State) -> list[dict]:
    return [p for p in s.observed.pods if attempt_of(p) == s.attempt]


def alive(pod: Mapping[str, Any]) -> bool:
    """A pod whose containers may still run: not Succeeded/Failed (a Terminating pod is alive)."""
    return (pod.get("status") or {}).get("phase") not in TERMINAL


def old_pods_alive(s: State) -> bool:
    """Pods of an earlier attempt (or of a deleted Job of this one) still running or terminating.

    Unbounded, as JobSet's BlockingRecreate: a new gang starts only once the old one is gone,
    however long its pods' own termination grace (checkpoint upload) takes.
    """
    return any(alive(p) for p in s.observed.pods if attempt_of(p) != s.attempt)


def job_condition(worker_job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (worker_job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def tear_down(s: State) -> None:
    worker = current_worker_job(s)
    if worker is not None:
        s.actions.append(DeleteWorkerJob(worker["metadata"]["name"]))


def record_attempt(s: State, **fields: Any) -> None:
    """Start or update the current attempt's entry in the bounded status.attempts history."""
    history = [dict(a) for a in s.status.get("attempts") or [] if isinstance(a, Mapping)]
    entry = next((a for a in history if a.get("attempt") == s.attempt), None)
    if entry is None:
        entry = {"attempt": s.attempt, "startTime": timestamp(s.now)}
        history.append(entry)
    entry.update({k: v for k, v in fields.items() if v is not None})
    s.status["attempts"] = history[-MAX_ATTEMPT_HISTORY:]


def stop_stale_attempts(s: State) -> None:
    """Worker Jobs of earlier attempts: stop any that may still run pods; keep the last failed ones.

    A failed attempt's Job stays (its pods hold the logs) for the last KEEP_FAILED_ATTEMPTS
    attempts; older ones are deleted. An earlier attempt's Job that did not fail (a Kueue-managed
    gang suspended by deleting it, a pass that crashed after recording the next attempt) is
    deleted: its intent was recorded in the status by an earlier pass, so this never races it.
    """
    for worker in s.observed.worker_jobs:
        number = attempt_of(worker)
        if number is None or number >= s.attempt or worker["metadata"].get("deletionTimestamp"):
            continue
        pods = [p for p in s.observed.pods if attempt_of(p) == number]
        failed = (job_condition(worker, "Failed") or job_condition(worker, "FailureTarget")
                  or any((p.get("status") or {}).get("phase") == "Failed" for p in pods))
        if not failed or number < s.attempt - KEEP_FAILED_ATTEMPTS:
            s.actions.append(DeleteWorkerJob(worker["metadata"]["name"]))
