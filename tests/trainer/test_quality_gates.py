"""Quality gates (issue 33 item 4), set by the operator's runPolicy through the environment: training ends
as completed once validation reaches a target mAP; a NaN/inf loss is tolerated for a set number of steps
in a row (their updates skipped) and then fails the run, exit 4, naming the step and terms; status.json
names the best validated checkpoint."""
from __future__ import annotations

import math
import os

import pytest
import torch

from deformable_detr import exit_codes
from deformable_detr.errors import UsageError
from deformable_detr.runtime.checkpoint import load_checkpoint
from deformable_detr.runtime.quality_gates import (MAX_NON_FINITE_STEPS_ENV, TARGET_MAP_ENV, QualityGates,
                                                   gates_from_env)
from deformable_detr.tasks.train import loop as loop_module
from train_records import read_log, read_status
from test_train import tiny_train_spec, train_cli


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def _checkpoints(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("model_epoch_"))


def test_gates_from_the_environment_and_one_line_for_a_bad_value():
    assert gates_from_env({}) == QualityGates(target_map=None, max_non_finite_steps=1)
    assert gates_from_env({TARGET_MAP_ENV: "0.45", MAX_NON_FINITE_STEPS_ENV: "5"}) == QualityGates(0.45, 5)
    assert QualityGates(target_map=0.45).target_reached(0.45) and not QualityGates(0.45).target_reached(0.44)
    assert not QualityGates().target_reached(0.9)
    with pytest.raises(UsageError, match=f"^{TARGET_MAP_ENV}: 'high' is not accepted; accepted: a mAP from 0 to 1$"):
        gates_from_env({TARGET_MAP_ENV: "high"})
    with pytest.raises(UsageError, match=f"^{MAX_NON_FINITE_STEPS_ENV}: '0' is not accepted; accepted: an integer"):
        gates_from_env({MAX_NON_FINITE_STEPS_ENV: "0"})


def test_a_reached_target_map_ends_training_as_completed_keeping_the_best_checkpoint(tiny_coco, tmp_path, write_spec,
                                                                                   monkeypatch):
    monkeypatch.setenv(TARGET_MAP_ENV, "0.0")  # any validation reaches it: the first one ends the run
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", num_epochs=3, checkpoint_interval=2)
    assert train_cli(write_spec, spec) == 0
    folder = tmp_path / "results" / "train"
    # Epoch 0's checkpoint is saved although checkpoint_interval 2 would skip it: the run ends on it.
    assert _checkpoints(folder) == ["model_epoch_000_step_00002.pth"]
    status = read_status(str(folder))
    assert status["state"] == "completed" and status["step"] == 2 and status["epoch"] == 1
    assert status["stop_reason"].startswith("validation mAP ") and "reached the target 0 at epoch 0" in \
        status["stop_reason"]
    assert status["percent"] == pytest.approx(100 * 2 / 6, abs=0.01)  # 2 of 3 x 2 steps: not claimed done
    assert status["best_checkpoint"] == str(folder / "model_epoch_000_step_00002.pth")
    assert status["best_epoch"] == 0 and status["best_map"] == status["last_map"]
    records = read_log(str(folder))
    assert [r["kind"] for r in records if r["kind"] in ("target_reached", "epoch")] == ["target_reached", "epoch"]


def test_the_best_checkpoint_is_the_best_validated_one_and_a_finished_run_is_100_percent(tiny_coco, tmp_path,
                                                                                       write_spec):
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", num_epochs=3)
    assert train_cli(write_spec, spec) == 0
    folder = tmp_path / "results" / "train"
    validations = [r for r in read_log(str(folder)) if r["kind"] == "validation"]
    best = max(validations, key=lambda r: (r["mAP"], -r["epoch"]))  # a tie keeps the earlier checkpoint
    status = read_status(str(folder))
    assert (status["best_map"], status["best_epoch"]) == (best["mAP"], best["epoch"])
    assert os.path.basename(status["best_checkpoint"]) == f"model_epoch_{best['epoch']:03d}_step_{best['step']:05d}.pth"
    assert os.path.isfile(status["best_checkpoint"])
    assert status["percent"] == 100.0 and status["eta_seconds"] == 0.0 and status["images_per_second"] > 0
    assert status["stop_reason"] is None


def _nan_at_steps(monkeypatch, steps: set[int]) -> None:
    """The model's outputs become NaN at these training steps (1-based), so their loss and gradients are."""
    real = loop_module.float_outputs
    calls = []

    def nanify(value):
        if torch.is_tensor(value):
            return value * float("nan")
        if isinstance(value, dict):
            return {k: nanify(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(nanify(v) for v in value)
        return value

    def outputs(value):
        calls.append(1)
        return real(nanify(value) if len(calls) in steps else value)

    monkeypatch.setattr(loop_module, "float_outputs", outputs)


@pytest.mark.parametrize("clip_grad_norm", [0.0, 0.1])
def test_nan_losses_within_the_allowed_steps_in_a_row_skip_their_updates(tiny_coco, tmp_path, write_spec, monkeypatch,
                                                                         clip_grad_norm):
    monkeypatch.setenv(MAX_NON_FINITE_STEPS_ENV, "3")
    _nan_at_steps(monkeypatch, {2, 3})
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", clip_grad_norm=clip_grad_norm)
    assert train_cli(write_spec, spec) == 0
    folder = tmp_path / "results" / "train"
    steps = [r for r in read_log(str(folder)) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["loss"] is None for r in steps] == [False, True, True, False]  # NaN is written as null
    weights = load_checkpoint(str(folder / "model_epoch_001_step_00004.pth"))["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if torch.is_tensor(t) and t.is_floating_point())
    assert math.isfinite(steps[-1]["loss"]) and read_status(str(folder))["state"] == "completed"


def test_nan_losses_for_the_allowed_steps_in_a_row_fail_the_run_naming_step_and_terms(tiny_coco, tmp_path,
                                                                                    write_spec, monkeypatch, capsys):
    monkeypatch.setenv(MAX_NON_FINITE_STEPS_ENV, "2")
    _nan_at_steps(monkeypatch, {2, 3})
    assert train_cli(write_spec, tiny_train_spec(tiny_coco, tmp_path / "results")) == exit_codes.DIVERGED.code
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("deformable-detr train: error: training diverged at epoch 1 (0-based), step 3: loss nan (")
    assert "loss_ce nan" in lines[0] and "for 2 steps in a row (from step 2)" in lines[0]
    assert read_status(str(tmp_path / "results" / "train"))["state"] == "failed"
