"""Issue 30's failure rules on the local control plane: the real API server refuses a bad rule at
`kubectl apply`, and the operator applies a job's rule to the trainer's termination message as the
kubelet reports it (KWOK ends the pod with it), naming the rule in status and in an event."""
from __future__ import annotations

import json
import uuid

import pytest

from conftest import events_of, job_status
from test_local_cluster import _end_pod, _kwok_job, _running_pods, _wait_phase, local  # noqa: F401 - `local` is the module fixture


@pytest.mark.parametrize("rule, refusal", [
    ({"name": "r", "action": "FailJob", "logPattern": "CUDA (error"}, "error parsing regexp"),
    ({"name": "r", "action": "Retry", "exitCodes": [1]}, 'Unsupported value: "Retry"'),
    ({"name": "r", "action": "FailJob", "failureClasses": ["Gremlins"]}, 'Unsupported value: "Gremlins"'),
])
def test_a_bad_failure_rule_is_refused_at_apply(local, rule, refusal):
    job = _kwok_job(local, f"bad-rule-{uuid.uuid4().hex[:5]}", runPolicy={"failurePolicy": {"rules": [rule]}})
    result = local.kubectl("apply", "--validate=strict", "-f", "-", stdin=json.dumps(job), check=False)
    assert result.returncode != 0, f"the API server accepted {rule}"
    assert refusal in result.stderr, result.stderr


def test_a_rule_on_the_trainers_failure_class_restarts_what_would_fail_and_names_itself(local):
    cluster, name = local, "kwok-oom-rule"
    rules = [{"name": "nan-fails", "action": "FailJob", "failureClasses": ["NaN"]},
             {"name": "oom-retries", "action": "RestartJob", "failureClasses": ["OOM"]}]
    cluster.apply([_kwok_job(cluster, name, runPolicy={"backoffLimit": 1, "failurePolicy": {"rules": rules}})])
    first = _running_pods(cluster, name, 2, attempt=0)
    head = {"class": "OOM", "exitCode": 1, "step": 17, "rank": 1, "reason": "CUDA out of memory. Tried to allocate"}
    _end_pod(cluster, first[1], code=1, message=json.dumps(head))  # exit 1: permanent without the rule
    second = _running_pods(cluster, name, 2, attempt=1)
    status = job_status(cluster, name)
    last = status["lastFailure"]
    assert (last["rule"], last["action"], last["failureClass"], last["step"]) == ("oom-retries", "RestartJob", "OOM", 17)
    assert status["restarts"] == 1
    assert any(e["reason"] == "FailureRuleMatched" and "oom-retries decided RestartJob for OOM at step 17"
               in e["message"] for e in events_of(cluster, name))
    # The next failure is NaN: the first rule fails the job although exit 200 is retryable.
    _end_pod(cluster, second[0], code=200, message=json.dumps({**head, "class": "NaN", "step": 30}))
    status = _wait_phase(cluster, name, "Failed")
    assert status["lastFailure"]["rule"] == "nan-fails" and status["lastFailure"]["step"] == 30
