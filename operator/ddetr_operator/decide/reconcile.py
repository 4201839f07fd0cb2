"""The pass: observed children -> next status and actions (pure: no I/O, `now` is passed in).

Level-triggered: running it twice (an operator restart mid-reconcile) creates nothing twice, since
child names are deterministic and "already exists" counts as success.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

from ..api import run_policy_of
from ..validate import JobSpecError, Policy, check_job
from .attempts import current_attempt, current_worker_job, stop_stale_attempts, tear_down
from .conditions import transition
from .deadlines import deadline_exceeded
from .gang import ensure_support_children, follow, start_attempt, suspend
from .lifetime import finished
from .model import OWN_STATUS, TERMINAL, Decision, Observed, State, as_mapping
from .progress import record_progress, show_with_any_patch


def new_state(job: Mapping[str, Any], observed: Observed, now: dt.datetime, policy: Policy = Policy()) -> State:
    old = dict(as_mapping(job.get("status")))
    status: dict[str, Any] = {k: old[k] for k in OWN_STATUS if k in old}
    status.setdefault("restarts", 0)
    status.setdefault("conditions", [])
    status["attempt"] = current_attempt(status, [*observed.worker_jobs, *observed.pods])
    return State(body=job, observed=observed, now=now, policy=policy, status=status, run_policy=run_policy_of(job))


def reconcile(job: Mapping[str, Any], observed: Observed, now: dt.datetime, policy: Policy = Policy()) -> Decision:
    """The next status of `job` and the actions that move its children towards it."""
    s = new_state(job, observed, now, policy)
    if s.status.get("phase") in TERMINAL:
        finished(s)
        return s.decision()
    try:
        checked = check_job(job, policy)
    except JobSpecError as err:
        tear_down(s)  # an edit can make a running job's spec invalid
        transition(s, "Failed", "InvalidSpec", str(err))
        return s.decision()
    s.job = checked.job
    ensure_support_children(s, checked.experiment)
    stop_stale_attempts(s)
    record_progress(s)
    worker = current_worker_job(s)
    if deadline_exceeded(s, worker):
        pass
    elif s.run_policy.suspend:
        suspend(s, worker)
    elif worker is None:
        start_attempt(s)
    else:
        follow(s, worker)
    show_with_any_patch(s, as_mapping(job.get("status")))
    return s.decision()
