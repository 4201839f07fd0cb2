"""Phases and conditions: a transition sets the phase's condition True and the other active ones
False (keeping why they last held), with an event when the phase changes; Stalled says why a gang
cannot start."""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping, Sequence

from .model import MAX_MESSAGE, TERMINAL, Event, State, timestamp

# The condition type that records each phase (Pending is recorded as "Created").
PHASE_CONDITION = {"Pending": "Created", "Running": "Running", "Restarting": "Restarting",
                   "Suspended": "Suspended", "Succeeded": "Succeeded", "Failed": "Failed"}
ACTIVE_CONDITIONS = ("Running", "Restarting", "Suspended")
STALLED = "Stalled"  # condition type: the current attempt's pods cannot start (reason says why)


def set_condition(conditions: Sequence[Mapping[str, Any]], type_: str, status: str, reason: str,
                  message: str, now: dt.datetime) -> list[dict]:
    """Kubernetes-style: lastTransitionTime moves only when status changes."""
    out, found = [], False
    for cond in conditions:
        cond = dict(cond)
        if cond["type"] == type_:
            found = True
            if cond.get("status") != status:
                cond["lastTransitionTime"] = timestamp(now)
            cond.update(status=status, reason=reason, message=message)
        out.append(cond)
    if not found:
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": timestamp(now)})
    return out


def condition(s: State, type_: str, true_only: bool = False) -> Mapping[str, Any] | None:
    return next((c for c in s.status["conditions"] if c.get("type") == type_
                 and (not true_only or c.get("status") == "True")), None)


def transition(s: State, phase: str, reason: str, message: str) -> None:
    message = message[-MAX_MESSAGE:]
    conditions = s.status["conditions"]
    was_true = any(c["type"] == PHASE_CONDITION[phase] and c.get("status") == "True" for c in conditions)
    for other in ACTIVE_CONDITIONS:
        previous = next((c for c in conditions if c["type"] == other), None)
        if other != PHASE_CONDITION[phase] and previous is not None:
            # Only the status flips: the reason and message keep saying why it last held (the
            # preemption behind the last restart stays readable once the new gang runs).
            conditions = set_condition(conditions, other, "False", previous.get("reason") or reason,
                                       previous.get("message") or message, s.now)
    s.status["conditions"] = set_condition(conditions, PHASE_CONDITION[phase], "True", reason, message, s.now)
    if s.status.get("phase") != phase or not was_true:
        s.events.append(Event("Warning" if phase in ("Failed", "Restarting") else "Normal", reason, message))
    s.status["phase"] = phase
    if phase in TERMINAL:
        s.status.setdefault("completionTime", timestamp(s.now))
        stalled(s, None)


def stalled(s: State, blocker: tuple[str, str] | None) -> None:
    """Condition Stalled: True (reason, message) while the attempt's pods cannot start; a Warning
    event each time the reason or message changes."""
    previous = condition(s, STALLED)
    if blocker is None:
        if previous is not None and previous.get("status") == "True":
            s.status["conditions"] = set_condition(s.status["conditions"], STALLED, "False", "WorkersStarted",
                                                   "the gang's pods are no longer blocked", s.now)
        return
    reason, message = blocker[0], blocker[1][-MAX_MESSAGE:]
    if previous is None or previous.get("status") != "True" or previous.get("reason") != reason \
            or previous.get("message") != message:
        s.events.append(Event("Warning", reason, message))
    s.status["conditions"] = set_condition(s.status["conditions"], STALLED, "True", reason, message, s.now)
