"""Failure rules: which rule decides what a failure leads to. The user's runPolicy.failurePolicy.rules
first, in order, then the built-in rules; the first that matches decides, and its name goes into the
status, as in JobSet's failure policy and the Job API's podFailurePolicy.

Pure: a Failure (decide/failures.py) and the rules in, a Verdict out.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

from ..api import FailureRule

FAIL, RESTART, RESTART_NOT_COUNTED = "FailJob", "RestartJob", "RestartJobAndIgnoreBackoff"


@dataclasses.dataclass(frozen=True)
class Verdict:
    rule: str  # the user's rule name, or builtin:<name>
    action: str  # one of api.FAILURE_ACTIONS


@dataclasses.dataclass(frozen=True)
class Facts:
    """What rules match on, read from the failed pod and the gang."""

    retryable: bool
    disruption: bool = False
    exit_code: int | None = None
    termination_reason: str | None = None
    pod_conditions: tuple[str, ...] = ()
    failure_class: str | None = None
    log: str = ""


def _matches(rule: FailureRule, facts: Facts) -> bool:
    checks = (
        rule.exit_codes is None or facts.exit_code in rule.exit_codes,
        rule.termination_reasons is None or facts.termination_reason in rule.termination_reasons,
        rule.pod_conditions is None or any(c in rule.pod_conditions for c in facts.pod_conditions),
        rule.failure_classes is None or facts.failure_class in rule.failure_classes,
        rule.log_pattern is None or re.search(rule.log_pattern, facts.log, re.MULTILINE) is not None,
    )
    return all(checks)


# (name, when, action): what the operator did before rules existed, in order.
BUILTIN_RULES = (
    ("builtin:disruption", lambda f: f.disruption, RESTART_NOT_COUNTED),
    ("builtin:permanent-exit-code", lambda f: not f.retryable, FAIL),
    ("builtin:retryable", lambda f: True, RESTART),
)


def decide(rules: Sequence[FailureRule], facts: Facts) -> Verdict:
    """The first of the user's rules that matches, else the first built-in one."""
    for rule in rules:
        if _matches(rule, facts):
            return Verdict(rule.name, rule.action)
    return next(Verdict(name, action) for name, when, action in BUILTIN_RULES if when(facts))


def parse_termination_message(text: str | None) -> tuple[Mapping[str, Any], str]:
    """(the trainer's JSON head line, the log lines after it) of a termination message; ({}, text)
    when it has no head (the kubelet's fallback to the last log lines, or another program)."""
    text = (text or "").strip()
    head, _, rest = text.partition("\n")
    if head.startswith("{"):
        try:
            fields = json.loads(head)
        except ValueError:
            fields = None
        if isinstance(fields, dict) and isinstance(fields.get("class"), str):
            return fields, rest
    return {}, text
