"""Issue 33 end to end on the local control plane: a job with runPolicy.targetMap ends as Succeeded at
its first validation, and its status says how far it got (percent, `kubectl get`'s Done% and Goodput
columns), which checkpoint is the best, why it stopped and where its time went (status.goodput)."""
from __future__ import annotations

from test_cluster import _wait_for_phase


def test_a_reached_target_map_succeeds_early_with_progress_best_checkpoint_and_goodput(cluster, operator_release,
                                                                                    s3_store, dataset):
    name = "e2e-worth"
    job = cluster.training_job(name, num_epochs=4)
    job["spec"]["runPolicy"]["targetMap"] = 0.0  # any validation reaches it: the first one ends training
    cluster.apply([job])

    status = _wait_for_phase(cluster, name, "Succeeded")["status"]
    progress = status["progress"]
    assert "reached the target 0 at epoch 0" in progress["stopReason"], progress
    assert progress["epoch"] == 1 and progress["percent"] == 25.0 and progress["state"] == "completed"
    best = status["bestCheckpoint"]
    assert best["epoch"] == 0 and best["uri"].startswith("s3://") and "model_epoch_000_step_" in best["uri"]
    assert best["map"] == progress["lastMap"]
    goodput = status["goodput"]
    parts = ("trainingSeconds", "evalSeconds", "checkpointSeconds", "startupSeconds", "recomputedSeconds",
             "hangSeconds", "waitingSeconds")
    assert abs(sum(goodput[p] for p in parts) - goodput["totalSeconds"]) < 0.5, goodput  # every second placed
    assert 0 < goodput["ratio"] < 1 and goodput["trainingSeconds"] > 0 and goodput["evalSeconds"] > 0
    assert goodput["waitingSeconds"] > 0  # scheduling and the pods' start before the trainer's own start-up
    header, row = cluster.kubectl("get", "deformabledetrjobs", name).splitlines()[:2]
    assert header.split()[:7] == ["NAME", "PHASE", "NODES", "EPOCH", "DONE%", "ETA", "GOODPUT"], header
    assert row.split()[4] == "25" and row.split()[6] == str(goodput["ratio"]), row
