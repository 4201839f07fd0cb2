"""Issue 30 item 1 end to end on the local control plane (its pod runner runs the pods as real
processes): one rank's process SIGSTOPped mid-training leaves every pod Running and rank 0 waiting
in its collective. Each guard alone ends the attempt: runPolicy.progressDeadlineSeconds (the
operator: Hung), or train.step_timeout_s (rank 0's watchdog exits 200 with a termination message of
class Hung, which reaches status.lastFailure through the pod's status); the gang restarts, resumes
from its newest checkpoint and Succeeds. Prints how long each guard took."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import events_of
from test_cluster import _job, _wait_for_phase, _worker_pods

DEADLINE_S = 60


@pytest.fixture(scope="module")
def ready(cluster, operator_release, s3_store, dataset):
    if not cluster.local:
        pytest.skip("needs the local control plane's pod runner to SIGSTOP a rank's process; runs when KUBECONFIG "
                    "is unset")
    return cluster


def _rank_one_stopped_until(cluster, name: str, what: str, condition, timeout: float):
    """After the job's first checkpoint, SIGSTOP rank 1's process until `condition` holds (then SIGCONT:
    its pod is being deleted; let it die on its SIGTERM). Returns the condition's value and the seconds
    it took from the stop."""
    def first_checkpoint():
        status = _job(cluster, name).get("status") or {}
        if status.get("phase") in ("Failed", "Succeeded"):
            raise AssertionError(f"{name} ended ({status['phase']}) before its first checkpoint: "
                                 f"{json.dumps(status.get('conditions'), indent=1)[-3000:]}")
        return status.get("phase") == "Running" and (status.get("progress") or {}).get("lastCheckpoint")
    cluster.wait_until("the first checkpoint", first_checkpoint, 1200, every=2)

    (victim,) = _worker_pods(cluster, name, attempt=0, index=1)
    pids = cluster.wait_until("rank 1's process", lambda: cluster.rank_pids(victim), 120, every=1)
    os.kill(pids[0], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        value = cluster.wait_until(what, condition, timeout, every=1)
        return value, time.monotonic() - stopped_at
    finally:
        try:
            os.kill(pids[0], signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_a_sigstopped_rank_is_caught_by_the_progress_deadline_and_the_job_still_succeeds(ready):
    cluster, name = ready, "e2e-hang"
    job = cluster.training_job(name, num_epochs=5)
    job["spec"]["terminationGracePeriodSeconds"] = 30  # the stopped rank never answers SIGTERM
    job["spec"]["runPolicy"]["progressDeadlineSeconds"] = DEADLINE_S
    cluster.apply([job])

    hung, caught = _rank_one_stopped_until(cluster, name, "the job to be Hung", lambda: (
        _job(cluster, name).get("status") or {}).get("hangs", 0) >= 1 and _job(cluster, name)["status"],
        DEADLINE_S + 120)
    last = hung["lastFailure"]
    assert last["reason"] == "Hung" and last["failureClass"] == "Hung" and last["attempt"] == 0
    assert "rank 0's heartbeat has not advanced" in last["message"] and "last step" in last["message"]
    assert any(e["reason"] == "Hung" for e in events_of(cluster, name))
    print(f"progress deadline: rank 1 SIGSTOPped -> status Hung after {caught:.1f} s "
          f"(runPolicy.progressDeadlineSeconds {DEADLINE_S}; status.json every 10 s, passes every 3 s)")
    # The heartbeat may have stood still a little before the stop (status.json is written every 10 s).
    assert caught < DEADLINE_S + 40

    done = _wait_for_phase(cluster, name, "Succeeded")["status"]
    assert done["hangs"] == 1 and done["restarts"] == 1
    attempt = int(done["workerJob"].rpartition("-a")[2])
    (rank0,) = _worker_pods(cluster, name, attempt=attempt, index=0)
    assert "resuming from" in cluster.pod_log(rank0)
    assert done["progress"]["epoch"] >= done["progress"]["numEpochs"] - 1


STEP_TIMEOUT_S = 60


def test_the_trainers_step_watchdog_ends_a_hung_rank_and_its_message_reaches_the_status(ready):
    cluster, name = ready, "e2e-watchdog"
    job = cluster.training_job(name, num_epochs=5)
    job["spec"]["terminationGracePeriodSeconds"] = 30
    job["spec"]["env"].append({"name": "DDETR_MSDA_IMPL", "value": "reference"})  # no kernel build in the first step
    job["spec"]["experiment"]["train"]["step_timeout_s"] = STEP_TIMEOUT_S
    cluster.apply([job])

    failed, caught = _rank_one_stopped_until(cluster, name, "the attempt to fail", lambda: (
        _job(cluster, name).get("status") or {}).get("lastFailure"), STEP_TIMEOUT_S + 180)
    # Rank 0's watchdog: its pod exits 200, its termination message (class Hung) read from the pod status.
    assert (failed["exitCode"], failed["failureClass"], failed["rank"]) == (200, "Hung", 0), failed
    assert failed["rule"] == "builtin:retryable" and failed["step"] > 0
    assert "no training step finished in" in failed["message"]
    print(f"step watchdog in a pod: rank 1 SIGSTOPped -> status.lastFailure Hung (exit 200 from rank 0's pod) after "
          f"{caught:.1f} s (train.step_timeout_s {STEP_TIMEOUT_S})")
    assert caught < STEP_TIMEOUT_S + 60

    done = _wait_for_phase(cluster, name, "Succeeded")["status"]
    assert done["restarts"] == 1 and not done.get("hangs")  # the operator's own guard never acted
    attempt = int(done["workerJob"].rpartition("-a")[2])
    (rank0,) = _worker_pods(cluster, name, attempt=attempt, index=0)
    assert "resuming from" in cluster.pod_log(rank0)
