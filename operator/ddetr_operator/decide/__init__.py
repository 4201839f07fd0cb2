"""Observed state -> next status and actions: small pure functions, one concern each, composed by
one short pass (reconcile.py). What each module decides: docs/architecture.md."""
from __future__ import annotations

from .attempts import KEEP_FAILED_ATTEMPTS, attempt_of, current_attempt
from .child_errors import CHILD_CREATE_FAILED, CHILD_REJECTED, ChildError, settle
from .conditions import set_condition
from .deadlines import blocker
from .failure_rules import BUILTIN_RULES, Verdict, decide
from .failures import Failure, first_failure, is_retryable_exit, pod_failure
from .lifetime import ttl_expired, wants_pass
from .model import (TERMINAL, Action, Create, Decision, DeleteSelf, DeleteWorkerJob, Event, Observed, SetSuspend,
                    parse_time, timestamp)
from .progress import progress_status
from .reconcile import reconcile

__all__ = ["KEEP_FAILED_ATTEMPTS", "attempt_of", "current_attempt", "CHILD_CREATE_FAILED", "CHILD_REJECTED",
           "ChildError", "settle", "set_condition", "blocker", "BUILTIN_RULES", "Verdict", "decide", "Failure", "first_failure",
           "is_retryable_exit", "pod_failure", "ttl_expired", "wants_pass", "TERMINAL", "Action", "Create",
           "Decision", "DeleteSelf", "DeleteWorkerJob", "Event", "Observed", "SetSuspend", "parse_time",
           "timestamp", "progress_status", "reconcile"]
