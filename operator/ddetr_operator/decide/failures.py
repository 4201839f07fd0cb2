"""Failures: why a gang broke (the first failed pod, or a disruption anywhere) and what follows,
as a table from the kind of failure to its action: fail, restart counted against backoffLimit,
or restart not counted (a disruption is not the job's fault).

Exit codes decide as in Kubeflow's ExitCode policy (deformable_detr.exit_codes): 1-127 permanent,
128-255 (signals) and the trainer's own retryable codes retried; a pod lost without an exit code too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from deformable_detr import exit_codes

from ..render import CONTAINER, worker_job_name
from .attempts import record_attempt
from .conditions import transition
from .model import MAX_MESSAGE, State, timestamp

INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
is_retryable_exit = exit_codes.is_retryable


@dataclasses.dataclass(frozen=True)
class Failure:
    retryable: bool
    reason: str
    message: str
    disruption: bool = False  # preempted, evicted, node drained: restarted without using backoffLimit
    pod: str | None = None
    rank: int | None = None
    exit_code: int | None = None


def _rank(pod: Mapping[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    value = (meta.get("labels") or {}).get(INDEX_LABEL) or (meta.get("annotations") or {}).get(INDEX_LABEL)
    return int(value) if value is not None and str(value).isdigit() else None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return (status.get("state") or {}).get("terminated")
    return None


def pod_failure(pod: Mapping[str, Any]) -> Failure:
    """Why one failed pod failed, with the last log lines kubelet kept as its termination message."""
    name = pod["metadata"]["name"]
    terminated = _terminated(pod)
    if terminated is None or terminated.get("exitCode") is None:
        status = pod.get("status") or {}
        reason = status.get("reason") or "PodFailed"
        return Failure(True, reason, f"pod {name}: {reason}: {status.get('message', 'lost before it exited')}",
                       pod=name, rank=_rank(pod))
    code = int(terminated["exitCode"])
    detail = (terminated.get("message") or "").strip()
    what = terminated.get("reason") or "Error"
    message = f"pod {name} exited with code {code} ({what})" + (f"; last log lines:\n{detail}" if detail else "")
    return Failure(is_retryable_exit(code), "OOMKilled" if what == "OOMKilled" else f"ExitCode{code}", message,
                   pod=name, rank=_rank(pod), exit_code=code)


def _disruption(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Kubernetes marks pods it evicts, preempts or takes off a lost node with DisruptionTarget."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return cond
    return None


def first_failure(pods: Sequence[Mapping[str, Any]]) -> Failure | None:
    """The failure that broke the gang: the earliest failed pod (the others follow it).

    A disrupted pod anywhere in the gang makes the failure retryable whatever the exit
    codes: its peers exit 1 when it vanishes, which must not read as a permanent error.
    """
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return None
    for pod in pods:
        disruption = _disruption(pod)
        if disruption is not None:
            reason = disruption.get("reason") or "DisruptionTarget"
            terminated = _terminated(pod) or {}
            return Failure(True, reason, f"pod {pod['metadata']['name']} was disrupted: {reason}: "
                                         f"{disruption.get('message', '')}", disruption=True,
                           pod=pod["metadata"]["name"], rank=_rank(pod), exit_code=terminated.get("exitCode"))

    def finished(pod: Mapping[str, Any]) -> tuple[str, str]:
        terminated = _terminated(pod) or {}
        return (terminated.get("finishedAt") or "9999", pod["metadata"]["name"])
    return pod_failure(min(failed, key=finished))


# --- what follows a failure: one rule per kind, first match wins ------------------------

def _fail_permanent(s: State, failure: Failure) -> None:
    transition(s, "Failed", failure.reason, f"permanent failure, not retried: {failure.message}")


def _restart_disrupted(s: State, failure: Failure) -> None:
    # Preemption, eviction, a drained node: not the job's fault, so not counted in backoffLimit.
    s.status["disruptions"] = int(s.status.get("disruptions", 0)) + 1
    _restart(s, failure, f"restart after disruption {s.status['disruptions']} (not counted in backoffLimit)")


def _fail_backoff(s: State, failure: Failure) -> None:
    limit, restarts = s.run_policy.backoff_limit, int(s.status.get("restarts", 0))
    transition(s, "Failed", "BackoffLimitExceeded",
               f"{restarts} restart(s) used (backoffLimit {limit}); last failure: {failure.message}")


def _restart_counted(s: State, failure: Failure) -> None:
    restarts = int(s.status.get("restarts", 0)) + 1
    s.status["restarts"] = restarts
    _restart(s, failure, f"restart {restarts}/{s.run_policy.backoff_limit}")


def _restart(s: State, failure: Failure, detail: str) -> None:
    """Move the attempt number on; the next pass starts it once every pod of this one is gone."""
    s.status["attempt"] = s.attempt + 1
    s.status["restartTime"] = timestamp(s.now)
    s.status["workerJob"] = worker_job_name(s.name, s.attempt)
    transition(s, "Restarting", failure.reason, f"{detail} from the newest checkpoint after: {failure.message}")


def _out_of_restarts(s: State, _: Failure) -> bool:
    return int(s.status.get("restarts", 0)) >= s.run_policy.backoff_limit


# (when, action): the failure policy, in order.
FAILURE_POLICY: tuple[tuple[Callable[[State, Failure], bool], Callable[[State, Failure], None]], ...] = (
    (lambda s, f: not f.retryable, _fail_permanent),
    (lambda s, f: f.disruption, _restart_disrupted),
    (_out_of_restarts, _fail_backoff),
    (lambda s, f: True, _restart_counted),
)


def handle_failure(s: State, failure: Failure) -> None:
    """Record the failure and apply the first rule of FAILURE_POLICY that matches; delete nothing.

    The Job controller has already stopped the rest of the gang (the worker Job's backoffLimit
    is 0), and the failed attempt's Job and pods stay for `kubectl logs`.
    """
    s.status["workersReady"] = 0
    last = {"attempt": s.attempt, "rank": failure.rank, "pod": failure.pod, "exitCode": failure.exit_code,
            "reason": failure.reason, "message": failure.message[-MAX_MESSAGE:], "time": timestamp(s.now)}
    s.status["lastFailure"] = {k: v for k, v in last.items() if v is not None}
    record_attempt(s, finishTime=timestamp(s.now), outcome="Disrupted" if failure.disruption else "Failed",
                   reason=failure.reason, rank=failure.rank, exitCode=failure.exit_code)
    action = next(act for applies, act in FAILURE_POLICY if applies(s, failure))
    action(s, failure)
