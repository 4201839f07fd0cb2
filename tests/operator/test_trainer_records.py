"""The operator reads the trainer's new records (issue 35): a NaN failure (exit 4) is not retried, and
status.json's count of skipped training images shows in the job's status.progress."""
from __future__ import annotations

import json

from deformable_detr import exit_codes
from deformable_detr.runtime.status_file import TrainStatus, format_status
from ddetr_operator.decide import Observed, progress_status, reconcile
from operator_objects import pod, worker_job

from conftest import NOW


def test_a_diverged_training_is_failed_not_restarted(make_job):
    job = make_job(status=reconcile(make_job(), Observed(), NOW).status)
    head = json.dumps({"class": "NaN", "exitCode": exit_codes.DIVERGED.code, "step": 7, "rank": 0,
                       "reason": "training diverged at epoch 0 (0-based), step 7: loss nan"})
    observed = Observed(worker_jobs=[worker_job("demo", 0)], service=True, configmap=True, pods=[
        pod("demo", 0, 0, "Failed", exit_codes.DIVERGED.code, message=head), pod("demo", 0, 1, "Running")])
    decision = reconcile(job, observed, NOW)
    assert decision.status["phase"] == "Failed"
    assert not decision.status.get("restarts")
    assert decision.status["lastFailure"]["exitCode"] == exit_codes.DIVERGED.code


def test_skipped_training_images_show_in_the_jobs_progress():
    status = TrainStatus(num_epochs=4, epoch=1, step=9, skipped_samples=3, attempt=2,
                         not_uploaded=["model_epoch_001_step_00009.pth"])
    progress = progress_status(json.loads(format_status(status)), None, NOW)
    assert progress["skippedSamples"] == 3 and progress["epoch"] == 1 and progress["step"] == 9
