"""Issue 30 item 1 end to end on the local control plane (its pod runner runs the pods as real
processes): one rank's process SIGSTOPped mid-training leaves every pod Running and rank 0 waiting
in its collective; runPolicy.progressDeadlineSeconds ends the attempt as Hung, the gang restarts,
resumes from its newest checkpoint and Succeeds. Prints how long the guard took."""
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


def test_a_sigstopped_rank_is_caught_by_the_progress_deadline_and_the_job_still_succeeds(ready):
    cluster, name = ready, "e2e-hang"
    job = cluster.training_job(name, num_epochs=5)
    job["spec"]["terminationGracePeriodSeconds"] = 30  # the stopped rank never answers SIGTERM
    job["spec"]["runPolicy"]["progressDeadlineSeconds"] = DEADLINE_S
    cluster.apply([job])

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
        hung = cluster.wait_until("the job to be Hung", lambda: (_job(cluster, name).get("status") or {}).get(
            "hangs", 0) >= 1 and _job(cluster, name)["status"], DEADLINE_S + 120, every=1)
        caught = time.monotonic() - stopped_at
    finally:
        try:
            os.kill(pids[0], signal.SIGCONT)  # its pod is being deleted; let it die on its SIGTERM
        except ProcessLookupError:
            pass
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
