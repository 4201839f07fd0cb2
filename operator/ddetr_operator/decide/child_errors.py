"""The API server refusing a child request: permanent (the job fails, ChildRejected) or transient
(condition ChildCreateFailed, retried by the next pass)."""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Mapping

from .conditions import condition, set_condition, transition
from .model import MAX_MESSAGE, TERMINAL, Decision, Event, Observed
from .reconcile import new_state

CHILD_REJECTED = "ChildRejected"  # reason of the Failed condition: the request will never be accepted
CHILD_CREATE_FAILED = "ChildCreateFailed"  # condition type: a request failed, and is retried


@dataclasses.dataclass(frozen=True)
class ChildError:
    """The API server refused one of a pass's requests (create, patch or delete of a child)."""

    what: str  # "create Job demo-a0"
    code: int  # HTTP status
    reason: str  # the Status body's reason (Invalid, Forbidden, NotFound, ...)
    message: str  # the Status body's message: what the API server says is wrong

    @property
    def permanent(self) -> bool:
        """Will the same request fail again whatever the cluster does meanwhile?

        400/422: the object itself is bad (a toleration the API refuses). 404 on a create: the
        kind does not exist (a PodGroup without Volcano's CRD). Those need a new job. 401/403
        (RBAC, a quota exceeded), 409 (conflict), 429 and 5xx can pass later: retried.
        """
        return self.code in (400, 422) or (self.code == 404 and self.what.startswith("create "))

    def describe(self) -> str:
        return f"{self.what} was refused by the API server ({self.code} {self.reason}): {self.message}"


def settle(job: Mapping[str, Any], decision: Decision, error: ChildError | None, now: dt.datetime) -> Decision:
    """The pass's final status once its actions ran: `decision` when they all went through.

    When the API server refused one, the decided transitions did not happen (a "created"
    gang that was not created), so the status starts again from the job's own: a permanent
    refusal fails the job (reason ChildRejected, the server's message); a transient one sets
    the condition ChildCreateFailed and the next pass tries again. Either way a Warning event
    carries the message (once per distinct message for retries, not every pass).
    """
    if error is None:
        conditions = decision.status.get("conditions") or []
        if any(c.get("type") == CHILD_CREATE_FAILED and c.get("status") == "True" for c in conditions):
            decision.status["conditions"] = set_condition(conditions, CHILD_CREATE_FAILED, "False", "Accepted",
                                                          "the API server accepted the operator's requests", now)
        return decision
    again = new_state(job, Observed(), now)
    message = error.describe()[-MAX_MESSAGE:]
    if error.permanent and again.status.get("phase") not in TERMINAL:
        transition(again, "Failed", CHILD_REJECTED, message)
        return Decision(again.status, [], again.events, decision.heartbeat)
    previous = condition(again, CHILD_CREATE_FAILED)
    events = [] if previous and previous.get("status") == "True" and previous.get("message") == message else [
        Event("Warning", CHILD_CREATE_FAILED, message)]
    again.status["conditions"] = set_condition(again.status["conditions"], CHILD_CREATE_FAILED, "True",
                                               error.reason or f"HTTP{error.code}", message, now)
    again.status.setdefault("phase", "Pending")
    return Decision(again.status, [], events, decision.heartbeat)
