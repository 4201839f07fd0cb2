"""Failures: why a gang broke (the first failed pod, or a disruption anywhere) and what follows:
the failure rules' verdict (failure_rules.py): fail, restart counted against backoffLimit, or
restart not counted (a disruption is not the job's fault).

Exit codes decide as in Kubeflow's ExitCode policy (deformable_detr.exit_codes): 1-127 permanent,
128-255 (signals) and the trainer's own retryable codes retried; a pod lost without an exit code too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from deformable_detr import exit_codes

from ..render import CONTAINER, worker_job_name
from . import failure_rules
from .attempts import record_attempt
from .conditions import transition
from .failure_rules import Facts, parse_termination_message
from .model import MAX_MESSAGE, Event, State, timestamp

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
    termination_reason: str | None = None  # the container's (OOMKilled, Error)
    pod_conditions: tuple[str, ...] = ()  # conditions True on any pod of the gang
    failure_class: str | None = None  # the trainer's termination message (or Hung, from the operator)
    step: int | None = None
    log: str = ""  # the failed rank's last log lines

    def facts(self) -> Facts:
        return Facts(retryable=self.retryable, disruption=self.disruption, exit_code=self.exit_code,
                     termination_reason=self.termination_reason, pod_conditions=self.pod_conditions,
                     failure_class=self.failure_class, log=self.log)


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
    head, detail = parse_termination_message(terminated.get("message"))
    what = terminated.get("reason") or "Error"
    step = head.get("step") if isinstance(head.get("step"), int) else None
    said = f": {head['class']} at step {step}: {head.get('reason', '')}" if head else ""
    message = f"pod {name} exited with code {code} ({what}){said}" + (f"; last log lines:\n{detail}" if detail else "")
    return Failure(is_retryable_exit(code), "OOMKilled" if what == "OOMKilled" else f"ExitCode{code}", message,
                   pod=name, rank=_rank(pod), exit_code=code, termination_reason=what,
                   failure_class=head.get("class"), step=step,
                   log="\n".join(part for part in (str(head.get("reason") or ""), detail) if part))


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
    conditions = tuple(sorted({c["type"] for p in pods for c in (p.get("status") or {}).get("conditions") or []
                               if c.get("status") == "True" and c.get("type")}))
    for pod in pods:
        disruption = _disruption(pod)
        if disruption is not None:
            reason = disruption.get("reason") or "DisruptionTarget"
            terminated = _terminated(pod) or {}
            return Failure(True, reason, f"pod {pod['metadata']['name']} was disrupted: {reason}: "
                                         f"{disruption.get('message', '')}", disruption=True,
                           pod=pod["metadata"]["name"], rank=_rank(pod), exit_code=terminated.get("exitCode"),
                           termination_reason=terminated.get("reason"), pod_conditions=conditions)

    def finished(pod: Mapping[str, Any]) -> tuple[str, str]:
        terminated = _terminated(pod) or {}
        return (terminated.get("finishedAt") or "9999", pod["metadata"]["name"])
    return dataclasses.replace(pod_failure(min(failed, key=finished)), pod_conditions=conditions)


# --- what follows a failure: the verdict of the failure rules (failure_rules.py) --------

def _fail(s: State, failure: Failure, rule: str) -> None:
    why = "permanent failure" if rule.startswith("builtin:") else f"failure rule {rule}: FailJob"
    transition(s, "Failed", failure.reason, f"{why}, not retried: {failure.message}")


def _restart_not_counted(s: State, failure: Failure, rule: str) -> None:
    # Preemption, eviction, a drained node (or a rule that says so): not the job's fault, not counted.
    if failure.disruption:
        s.status["disruptions"] = int(s.status.get("disruptions", 0)) + 1
        detail = f"restart after disruption {s.status['disruptions']} (not counted in backoffLimit)"
    else:
        detail = f"restart not counted in backoffLimit (failure rule {rule})"
    _restart(s, failure, detail)


def _restart_counted(s: State, failure: Failure, rule: str) -> None:
    limit, restarts = s.run_policy.backoff_limit, int(s.status.get("restarts", 0))
    if restarts >= limit:
        transition(s, "Failed", "BackoffLimitExceeded",
                   f"{restarts} restart(s) used (backoffLimit {limit}); last failure: {failure.message}")
        return
    s.status["restarts"] = restarts + 1
    _restart(s, failure, f"restart {restarts + 1}/{limit}")


def _restart(s: State, failure: Failure, detail: str) -> None:
    """Move the attempt number on; the next pass starts it once every pod of this one is gone."""
    s.status["attempt"] = s.attempt + 1
    s.status["restartTime"] = timestamp(s.now)
    s.status["workerJob"] = worker_job_name(s.name, s.attempt)
    transition(s, "Restarting", failure.reason, f"{detail} from the newest checkpoint after: {failure.message}")


ACTIONS: dict[str, Callable[[State, Failure, str], None]] = {
    failure_rules.FAIL: _fail, failure_rules.RESTART: _restart_counted,
    failure_rules.RESTART_NOT_COUNTED: _restart_not_counted,
}


def user_rules(s: State) -> tuple:
    policy = s.run_policy.failure_policy
    return tuple(policy.rules or ()) if policy is not None else ()


def handle_failure(s: State, failure: Failure) -> None:
    """Record the failure and apply the action of the first failure rule that matches; delete nothing.

    The Job controller has already stopped the rest of the gang (the worker Job's backoffLimit
    is 0), and the failed attempt's Job and pods stay for `kubectl logs`.
    """
    verdict = failure_rules.decide(user_rules(s), failure.facts())
    s.status["workersReady"] = 0
    last = {"attempt": s.attempt, "rank": failure.rank, "pod": failure.pod, "exitCode": failure.exit_code,
            "reason": failure.reason, "message": failure.message[-MAX_MESSAGE:], "time": timestamp(s.now),
            "failureClass": failure.failure_class, "step": failure.step, "rule": verdict.rule,
            "action": verdict.action}
    s.status["lastFailure"] = {k: v for k, v in last.items() if v is not None}
    record_attempt(s, finishTime=timestamp(s.now), outcome="Disrupted" if failure.disruption else "Failed",
                   reason=failure.reason, rank=failure.rank, exitCode=failure.exit_code)
    if failure.failure_class is not None or verdict.rule in {r.name for r in user_rules(s)}:
        s.events.append(Event("Warning", "FailureRuleMatched",
                              f"failure rule {verdict.rule} decided {verdict.action} for "
                              f"{failure.failure_class or failure.reason} at step {failure.step}"
                              f" (pod {failure.pod}, exit code {failure.exit_code})"))
    ACTIONS[verdict.action](s, failure, verdict.rule)
