"""runPolicy.failurePolicy.rules: the user's rules first, the built-in ones after, the first match
decides and the status names it; what the CRD and the API server refuse; the trainer's termination
message read from the pod's status."""
from __future__ import annotations

import json

import pytest

from ddetr_operator import api
from ddetr_operator.decide import Observed, reconcile
from ddetr_operator.decide.failure_rules import BUILTIN_RULES, Facts, decide, parse_termination_message
from operator_objects import pod, worker_job
from test_crd import _example, crdcheck  # noqa: F401 - the API server's CRD checker fixture

from conftest import NOW

CHILDREN = dict(service=True, configmap=True)


def rules(*raw: dict) -> tuple:
    return api.parse(api.FailurePolicy, {"rules": list(raw)}, "spec.runPolicy.failurePolicy").rules


def trainer_message(cls: str, step: int, reason: str, tail: str = "") -> str:
    head = json.dumps({"class": cls, "exitCode": 1, "step": step, "rank": 3, "reason": reason})
    return head + ("\n" + tail if tail else "")


# --- the decision, pure ---------------------------------------------------------------------

def test_without_user_rules_the_builtin_rules_decide_as_before():
    assert decide((), Facts(retryable=False, exit_code=2)).rule == "builtin:permanent-exit-code"
    assert decide((), Facts(retryable=False, exit_code=2)).action == "FailJob"
    assert decide((), Facts(retryable=True, exit_code=200)).action == "RestartJob"
    disrupted = decide((), Facts(retryable=True, disruption=True))
    assert (disrupted.rule, disrupted.action) == ("builtin:disruption", "RestartJobAndIgnoreBackoff")
    assert [name for name, _, _ in BUILTIN_RULES][-1] == "builtin:retryable"


def test_user_rules_come_first_and_the_first_match_wins():
    user = rules({"name": "oom-restarts", "action": "RestartJob", "failureClasses": ["OOM"]},
                 {"name": "exit-1-fails", "action": "FailJob", "exitCodes": [1]},
                 {"name": "never-reached", "action": "RestartJobAndIgnoreBackoff", "failureClasses": ["OOM"]})
    verdict = decide(user, Facts(retryable=False, exit_code=1, failure_class="OOM"))
    assert (verdict.rule, verdict.action) == ("oom-restarts", "RestartJob")
    assert decide(user, Facts(retryable=False, exit_code=1, failure_class="Bug")).rule == "exit-1-fails"
    # No user rule matches: the built-in ones still apply.
    assert decide(user, Facts(retryable=True, exit_code=200, failure_class="NCCL")).rule == "builtin:retryable"


@pytest.mark.parametrize("rule, facts, matches", [
    ({"terminationReasons": ["OOMKilled"]}, Facts(True, termination_reason="OOMKilled"), True),
    ({"terminationReasons": ["OOMKilled"]}, Facts(True, termination_reason="Error"), False),
    ({"podConditions": ["DisruptionTarget"]}, Facts(True, pod_conditions=("Ready", "DisruptionTarget")), True),
    ({"podConditions": ["DisruptionTarget"]}, Facts(True, pod_conditions=("Ready",)), False),
    ({"logPattern": r"CUDA error: an illegal memory access"}, Facts(True, log="x\nCUDA error: an illegal memory access\n"),
     True),
    ({"logPattern": r"^NCCL WARN"}, Facts(True, log="step 3\nNCCL WARN timeout"), True),  # per line
    ({"logPattern": r"ECC"}, Facts(True, log="nothing here"), False),
    # Every matcher given must match.
    ({"exitCodes": [200], "failureClasses": ["Hung"]}, Facts(True, exit_code=200, failure_class="Hung"), True),
    ({"exitCodes": [200], "failureClasses": ["Hung"]}, Facts(True, exit_code=200, failure_class="NCCL"), False),
])
def test_each_matcher(rule, facts, matches):
    (parsed,) = rules({"name": "r", "action": "FailJob", **rule})
    assert (decide((parsed,), facts).rule == "r") is matches


def test_termination_message_head_and_log_lines():
    head, tail = parse_termination_message(trainer_message("OOM", 41, "CUDA out of memory", "INFO a\nERROR b"))
    assert head["class"] == "OOM" and head["step"] == 41 and tail == "INFO a\nERROR b"
    # The kubelet's fallback (last log lines) or another program's text: no head, all of it is log.
    assert parse_termination_message("Traceback ...\nValueError: x") == ({}, "Traceback ...\nValueError: x")
    assert parse_termination_message('{"not": "ours"}\nline') == ({}, '{"not": "ours"}\nline')
    assert parse_termination_message(None) == ({}, "")


# --- the decision in a pass -----------------------------------------------------------------

def _failed_pass(make_job, message: str, code: int = 1, reason: str = "Error", **spec):
    job = make_job(status=reconcile(make_job(**spec), Observed(), NOW).status, **spec)
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[
        pod("demo", 0, 0, "Running"), pod("demo", 0, 1, "Failed", code, reason=reason, message=message)], **CHILDREN)
    return reconcile(job, observed, NOW)


def test_a_user_rule_restarts_what_the_builtin_rules_fail_and_the_status_names_it(make_job):
    policy = {"failurePolicy": {"rules": [{"name": "oom-retry", "action": "RestartJob", "failureClasses": ["OOM"]}]}}
    decision = _failed_pass(make_job, trainer_message("OOM", 41, "CUDA out of memory", "ERROR boom"),
                            runPolicy=policy)
    assert decision.status["phase"] == "Restarting" and decision.status["restarts"] == 1
    last = decision.status["lastFailure"]
    assert (last["rule"], last["action"], last["failureClass"], last["step"]) == ("oom-retry", "RestartJob", "OOM", 41)
    assert "OOM at step 41: CUDA out of memory" in last["message"] and "ERROR boom" in last["message"]
    (matched,) = [e for e in decision.events if e.reason == "FailureRuleMatched"]
    assert "oom-retry decided RestartJob for OOM at step 41" in matched.message
    # Without the rule, exit 1 is permanent.
    plain = _failed_pass(make_job, trainer_message("OOM", 41, "CUDA out of memory"))
    assert plain.status["phase"] == "Failed"
    assert plain.status["lastFailure"]["rule"] == "builtin:permanent-exit-code"


def test_fail_job_stops_a_retryable_failure_and_ignore_backoff_is_not_counted(make_job):
    fail = {"failurePolicy": {"rules": [{"name": "bad-disk", "action": "FailJob", "logPattern": "Input/output error"}]}}
    decision = _failed_pass(make_job, "INFO step 3\nOSError: [Errno 5] Input/output error", code=201, runPolicy=fail)
    assert decision.status["phase"] == "Failed"
    assert decision.status["lastFailure"]["rule"] == "bad-disk"
    failed = next(c for c in decision.status["conditions"] if c["type"] == "Failed")
    assert failed["message"].startswith("failure rule bad-disk: FailJob, not retried")

    free = {"backoffLimit": 0,
            "failurePolicy": {"rules": [{"name": "nccl-free", "action": "RestartJobAndIgnoreBackoff",
                                         "failureClasses": ["NCCL"]}]}}
    decision = _failed_pass(make_job, trainer_message("NCCL", 7, "lost contact"), code=200, runPolicy=free)
    assert decision.status["phase"] == "Restarting"
    assert decision.status["restarts"] == 0 and not decision.status.get("disruptions")


def test_restart_job_still_respects_backoff_limit(make_job):
    policy = {"backoffLimit": 0,
              "failurePolicy": {"rules": [{"name": "oom-retry", "action": "RestartJob", "failureClasses": ["OOM"]}]}}
    decision = _failed_pass(make_job, trainer_message("OOM", 2, "CUDA out of memory"), runPolicy=policy)
    assert decision.status["phase"] == "Failed"
    assert next(c for c in decision.status["conditions"] if c["type"] == "Failed")["reason"] == "BackoffLimitExceeded"


# --- what the spec accepts ------------------------------------------------------------------

@pytest.mark.parametrize("rule, field", [
    ({"name": "x", "action": "Retry", "exitCodes": [1]}, "rules[0].action: str 'Retry' is not accepted; one of FailJob"),
    ({"name": "x", "action": "FailJob"}, "rules[0]: a failure rule needs at least one of"),
    ({"name": "x", "action": "FailJob", "logPattern": "(unclosed"}, "rules[0].logPattern: '(unclosed' is not a valid"),
    ({"name": "x", "action": "FailJob", "failureClasses": ["Gremlins"]}, "failureClasses[0]: str 'Gremlins'"),
    ({"name": "x", "action": "FailJob", "exitCodes": [256]}, "exitCodes[0]: 256 is out of range; accepted: 0..255"),
    ({"action": "FailJob", "exitCodes": [1]}, "rules[0].name: required"),
])
def test_the_operator_refuses_a_bad_rule_in_one_line_naming_it(rule, field):
    with pytest.raises(api.JobSpecError) as err:
        rules(rule)
    assert field in str(err.value)


def _with_rules(*raw: dict, **run_policy) -> dict:
    return _example(spec__runPolicy={"failurePolicy": {"rules": list(raw)}, **run_policy})


GOOD = {"name": "oom-retry", "action": "RestartJob", "failureClasses": ["OOM"], "logPattern": r"CUDA (error|out)"}
API_SERVER_CASES = {
    "good rules are accepted": (None, _with_rules(GOOD, {"name": "ecc", "action": "FailJob", "exitCodes": [1, 4],
                                                         "terminationReasons": ["Error"],
                                                         "podConditions": ["DisruptionTarget"]},
                                                  progressDeadlineSeconds=600), None),
    "a bad regex is refused": (None, _with_rules({**GOOD, "logPattern": "CUDA (error"}),
                               "error parsing regexp: missing closing )"),
    "an unknown action is refused": (None, _with_rules({**GOOD, "action": "Retry"}), 'Unsupported value: "Retry"'),
    "an unknown class is refused": (None, _with_rules({**GOOD, "failureClasses": ["Gremlins"]}),
                                    'Unsupported value: "Gremlins"'),
    "a rule matching nothing is refused": (None, _with_rules({"name": "x", "action": "FailJob"}),
                                           "needs at least one of"),
    "an exit code above 255 is refused": (None, _with_rules({**GOOD, "exitCodes": [300]}), "exitCodes[0]"),
    "a progress deadline under 30 s is refused": (None, _with_rules(GOOD, progressDeadlineSeconds=5),
                                                  "progressDeadlineSeconds"),
    "edited rules are refused": (_with_rules(GOOD), _with_rules({**GOOD, "action": "FailJob"}),
                                 "spec is immutable"),
}


def test_the_api_server_refuses_bad_rules(crdcheck):  # noqa: F811 - the fixture
    result = crdcheck([{"name": name, "old": old, "new": new} for name, (old, new, _) in API_SERVER_CASES.items()])
    assert result["crdErrors"] == []
    for name, (_, _, expected) in API_SERVER_CASES.items():
        errors = result["cases"][name]
        if expected is None:
            assert errors == [], (name, errors)
        else:
            assert errors and any(expected in e for e in errors), (name, errors)


def test_each_new_failure_is_counted_once_by_class_rule_and_action():
    from ddetr_operator import metrics

    labels = dict(namespace="ml-count", failure_class="OOM", rule="oom-retry", action="RestartJob")
    last = {"attempt": 0, "failureClass": "OOM", "rule": "oom-retry", "action": "RestartJob"}
    metrics.count_failure("ml-count", None, last)
    metrics.count_failure("ml-count", last, dict(last))  # the same failure seen again by a later pass
    assert metrics.registry.get_sample_value("ddetr_operator_job_failures_total", labels) == 1
    metrics.count_failure("ml-count", last, {**last, "attempt": 1})
    assert metrics.registry.get_sample_value("ddetr_operator_job_failures_total", labels) == 2
