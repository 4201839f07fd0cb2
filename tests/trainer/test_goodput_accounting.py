"""Goodput's trainer side (issue 33 item 3): status.json accounts where training's time went, over all
launches; one induced failure after a checkpoint loses exactly the steps trained since it, moved from
training time to recomputed time."""
from __future__ import annotations

import pytest

from deformable_detr.errors import UsageError
from deformable_detr.tasks.train.outputs import TrainOutputs
from train_records import read_log, read_status
from test_train import tiny_train_spec, train_cli


def test_a_failure_after_a_checkpoint_loses_the_steps_since_it_within_a_bound(tiny_coco, tmp_path, write_spec,
                                                                             monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", num_epochs=2, checkpoint_interval_unit="step",
                           checkpoint_interval=2)  # 2 steps an epoch: checkpoints at steps 2 and 4
    real_step = TrainOutputs.step

    def failing_step(self, position, *args, **kwargs):
        real_step(self, position, *args, **kwargs)
        if position.step == 3:  # one step past the checkpoint of step 2
            raise UsageError("induced failure")

    monkeypatch.setattr(TrainOutputs, "step", failing_step)
    assert train_cli(write_spec, spec) != 0
    monkeypatch.setattr(TrainOutputs, "step", real_step)
    folder = tmp_path / "results" / "train"
    failed = read_status(str(folder))
    assert failed["state"] == "failed" and failed["step"] == 3
    records = read_log(str(folder))
    lost = [r["step_seconds"] for r in records if r["kind"] == "step" and r["attempt"] == 1 and r["step"] == 3]
    assert failed["unsaved_seconds"] == pytest.approx(lost[0], abs=0.002)

    assert train_cli(write_spec, spec) == 0  # resumes from step 2 and trains steps 3 and 4 again
    status = read_status(str(folder))
    records = read_log(str(folder))
    steps = [r for r in records if r["kind"] == "step"]
    assert [(r["attempt"], r["step"]) for r in steps] == [(1, 1), (1, 2), (1, 3), (2, 3), (2, 4)]
    assert status["recomputed_steps"] == 1
    assert status["recomputed_seconds"] == pytest.approx(lost[0], abs=0.002)  # the lost time, known to 2 ms
    counted = sum(r["step_seconds"] for r in steps if (r["attempt"], r["step"]) != (1, 3))
    assert status["train_seconds"] == pytest.approx(counted, abs=0.01)
    # Two launches' start-ups, two validations, three checkpoints (steps 2, 4 and the end of epoch 1).
    assert status["startup_seconds"] > 0 and status["eval_seconds"] > 0 and status["checkpoint_seconds"] > 0
    assert status["unsaved_seconds"] == 0.0
