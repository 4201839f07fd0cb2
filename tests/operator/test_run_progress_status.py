"""What a run is worth in the job's status (issue 33): percent, recent images/s and ETA in status.progress
and `kubectl get`'s columns; the best checkpoint; the quality gates passed to the trainer's pods."""
from __future__ import annotations

import json

from deformable_detr.runtime.quality_gates import MAX_NON_FINITE_STEPS_ENV, TARGET_MAP_ENV
from deformable_detr.runtime.status_file import TrainStatus, format_status
from ddetr_operator import api, crd
from ddetr_operator.api import resolve
from ddetr_operator.decide import Observed, reconcile
from ddetr_operator.render import render_worker_job

from conftest import NOW


def _status_json(**fields) -> dict:
    return json.loads(format_status(TrainStatus(num_epochs=10, epoch=6, step=600, **fields)))


def test_progress_shows_percent_images_per_second_and_eta(make_job):
    trainer = _status_json(percent=60.0, images_per_second=8.0, eta_seconds=3725.0,
                           estimated_finish_time="2026-12-07T10:02:05Z", best_map=0.41, best_epoch=4,
                           best_checkpoint="s3://runs/demo/train/model_epoch_004_step_00500.pth")
    status = reconcile(make_job(), Observed(progress=trainer), NOW).status
    progress = status["progress"]
    assert (progress["percent"], progress["imagesPerSecond"], progress["estimatedFinishTime"]) == \
        (60.0, 8.0, "2026-12-07T10:02:05Z")
    # Not etaSeconds: a time left goes stale between patches, a finish time does not.
    assert "etaSeconds" not in progress
    assert status["bestCheckpoint"] == {"uri": "s3://runs/demo/train/model_epoch_004_step_00500.pth", "epoch": 4,
                                        "map": 0.41}


def test_a_warming_up_run_has_no_eta_and_no_best_checkpoint_before_a_validation(make_job):
    status = reconcile(make_job(), Observed(progress=_status_json(percent=0.5)), NOW).status
    assert status["progress"]["percent"] == 0.5
    assert "estimatedFinishTime" not in status["progress"]
    assert "bestCheckpoint" not in status


def test_kubectl_get_shows_percent_done_and_eta_columns():
    columns = {c["name"]: c for c in crd.build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Done%"] == {"name": "Done%", "type": "number", "jsonPath": ".status.progress.percent"}
    assert columns["ETA"] == {"name": "ETA", "type": "string", "jsonPath": ".status.progress.estimatedFinishTime"}


def test_quality_gates_reach_the_trainer_as_its_environment(make_job):
    def env_of(job: dict) -> dict:
        pod = render_worker_job(resolve(job), 0)["spec"]["template"]["spec"]
        return {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}

    gated = env_of(make_job(runPolicy={"targetMap": 0.45, "maxNonFiniteLossSteps": 5}))
    assert gated[TARGET_MAP_ENV] == "0.45" and gated[MAX_NON_FINITE_STEPS_ENV] == "5"
    plain = env_of(make_job())
    assert TARGET_MAP_ENV not in plain and MAX_NON_FINITE_STEPS_ENV not in plain


def test_quality_gate_bounds_are_checked():
    import pytest

    with pytest.raises(api.JobSpecError, match="targetMap"):
        api.parse(api.RunPolicy, {"targetMap": 1.5}, "spec.runPolicy")
    with pytest.raises(api.JobSpecError, match="maxNonFiniteLossSteps"):
        api.parse(api.RunPolicy, {"maxNonFiniteLossSteps": 0}, "spec.runPolicy")


def test_goodput_accounts_the_jobs_time_from_the_trainers_parts_hangs_and_waiting():
    import datetime as dt

    from ddetr_operator.decide.goodput import goodput_status

    created = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    trainer = _status_json(train_seconds=600.0, eval_seconds=60.0, checkpoint_seconds=30.0, startup_seconds=40.0,
                           recomputed_seconds=70.0, recomputed_steps=7)
    goodput = goodput_status(trainer, created, created + dt.timedelta(seconds=1000), hangs=1,
                             progress_deadline_seconds=120)
    assert goodput == {"trainingSeconds": 600.0, "evalSeconds": 60.0, "checkpointSeconds": 30.0, "startupSeconds": 40.0,
                       "recomputedSeconds": 70.0, "hangSeconds": 120.0, "waitingSeconds": 80.0, "totalSeconds": 1000.0,
                       "recomputedSteps": 7, "ratio": 0.6}
    # Clocks of two machines: what the trainer accounts is never more than the total.
    assert goodput_status(trainer, created, created + dt.timedelta(seconds=500), 0, None)["waitingSeconds"] == 0.0
    assert goodput_status(_status_json(), None, created, 0, None) is None


def test_goodput_in_status_kubectl_and_prometheus(make_job):
    from ddetr_operator import metrics

    job = make_job()
    job["metadata"]["creationTimestamp"] = "2026-01-02T02:04:05Z"  # an hour before conftest's NOW
    trainer = _status_json(train_seconds=1800.0, eval_seconds=100.0)
    goodput = reconcile(job, Observed(progress=trainer), NOW).status["goodput"]
    assert goodput["ratio"] == 0.5 and goodput["totalSeconds"] == 3600.0 and goodput["waitingSeconds"] == 1700.0
    columns = {c["name"]: c for c in crd.build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Goodput"] == {"name": "Goodput", "type": "number", "jsonPath": ".status.goodput.ratio"}
    metrics.record_goodput(job["metadata"], goodput)
    name = {"namespace": job["metadata"]["namespace"], "name": job["metadata"]["name"]}
    assert metrics.registry.get_sample_value("ddetr_operator_job_goodput_ratio", name) == 0.5
    assert metrics.registry.get_sample_value("ddetr_operator_job_time_seconds", {**name, "part": "waiting"}) == 1700.0
    metrics.forget_goodput(job["metadata"])
    assert metrics.registry.get_sample_value("ddetr_operator_job_goodput_ratio", name) is None
