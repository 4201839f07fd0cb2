"""Non-finite numbers (issue 35 item 3): nan/inf in a spec is refused at load, naming the field; a loss
or weights that become NaN/inf stop training with one line naming the step and the loss terms, exit 4
(permanent: the operator does not retry it), and nothing newer than the last finite checkpoint is saved."""
from __future__ import annotations

import math
import os

import pytest
import torch

from deformable_detr import exit_codes
from deformable_detr.cli import main
from deformable_detr.runtime.checkpoint import LATEST_NAME, load_checkpoint
from deformable_detr.tasks.train.loop import Trainer
from train_records import read_log, read_status
from test_train import tiny_train_spec, train_cli


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]


@pytest.mark.parametrize("override, field, given", [
    ("train.optim.lr=nan", "train.optim.lr", "nan"),
    ("train.optim.lr=inf", "train.optim.lr", "inf"),
    ("train.optim.momentum=-inf", "train.optim.momentum", "-inf"),
    ("train.optim.lr=1e400", "train.optim.lr", "1e400"),
    ("dataset.augmentation.input_std=[0.2,.nan,0.2]", "dataset.augmentation.input_std[1]", "nan"),
])
def test_a_non_finite_spec_number_is_one_line_naming_the_field(tiny_coco, tmp_path, write_spec, capsys,
                                                                override, field, given):
    spec = tiny_train_spec(tiny_coco, tmp_path / "results")
    assert train_cli(write_spec, spec, override) == exit_codes.BAD_INPUT.code
    assert _err_lines(capsys) == [
        f"deformable-detr train: error: {field}: {given} is not a finite number; accepted: a finite number"]
    assert not (tmp_path / "results").exists()


def test_a_non_finite_number_in_the_spec_file_is_refused_too(tiny_coco, tmp_path, write_spec, capsys):
    spec = tiny_train_spec(tiny_coco, tmp_path / "results")
    spec["train"]["optim"]["lr"] = float("inf")  # YAML writes .inf
    assert train_cli(write_spec, spec) == exit_codes.BAD_INPUT.code
    assert _err_lines(capsys) == [
        "deformable-detr train: error: train.optim.lr: inf is not a finite number; accepted: a finite number"]


def _diverging_spec(tiny_coco, results) -> dict:
    # lr 1e6 without clipping: step 1's loss is finite, its update sends step 2's loss to NaN.
    spec = tiny_train_spec(tiny_coco, results, batch_size=2, num_epochs=2, clip_grad_norm=0.0,
                           checkpoint_interval_unit="step", checkpoint_interval=1)
    spec["dataset"]["val_data_sources"] = []
    spec["train"]["optim"].update(lr=1e6, lr_backbone=1e6)
    return spec


def _checkpoints(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("model_epoch_"))


def _finite(path) -> bool:
    return all(torch.isfinite(t).all() for t in load_checkpoint(str(path))["model"].values()
               if torch.is_tensor(t) and t.is_floating_point())


def test_a_nan_loss_stops_training_with_exit_4_naming_the_step_and_terms(tiny_coco, tmp_path, write_spec, capsys):
    folder = tmp_path / "results" / "train"
    code = train_cli(write_spec, _diverging_spec(tiny_coco, tmp_path / "results"))
    assert code == exit_codes.DIVERGED.code == 4
    lines = _err_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("deformable-detr train: error: training diverged at epoch 0 (0-based), step 2: loss nan")
    for term in ("loss_ce nan", "loss_bbox nan", "loss_giou nan"):
        assert term in lines[0]
    assert "the newest checkpoint is from step 1, nothing later was saved; lower train.optim.lr" in lines[0]
    # What was kept: step 1's finite checkpoint (and latest = it), nothing of step 2; the run is marked failed.
    assert _checkpoints(folder) == ["model_epoch_000_step_00001.pth"]
    assert _finite(folder / "model_epoch_000_step_00001.pth")
    assert load_checkpoint(str(folder / LATEST_NAME))["step"] == 1
    status = read_status(str(folder))
    assert status["state"] == "failed" and status["step"] == 1
    steps = [r for r in read_log(str(folder)) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1] and math.isfinite(steps[0]["loss"])


def test_weights_gone_non_finite_under_a_finite_loss_are_not_saved(tiny_coco, tmp_path, write_spec, capsys,
                                                                    monkeypatch):
    """An update that overflows the weights while its loss was finite: the checkpoint due is refused."""
    real_step = Trainer._train_step
    calls = []

    def overflowing_step(self, *args):
        losses = real_step(self, *args)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(self._bare_model.parameters()).view(-1)[0] = float("inf")
        return losses

    monkeypatch.setattr(Trainer, "_train_step", overflowing_step)
    spec = _diverging_spec(tiny_coco, tmp_path / "results")
    spec["train"]["optim"].update(lr=1e-4, lr_backbone=1e-5)
    folder = tmp_path / "results" / "train"
    assert train_cli(write_spec, spec) == exit_codes.DIVERGED.code
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(
        "deformable-detr train: error: training diverged at epoch 0 (0-based), step 2: the weights are no longer "
        "finite (last loss terms: loss_bbox "), lines
    assert "the newest checkpoint is from step 1, nothing later was saved" in lines[0]
    assert _checkpoints(folder) == ["model_epoch_000_step_00001.pth"]
    assert _finite(folder / LATEST_NAME)


def test_the_operator_does_not_retry_a_diverged_run():
    from ddetr_operator.decide.failures import CONTAINER, pod_failure

    pod = {"metadata": {"name": "job-a0-0"},
           "status": {"containerStatuses": [{"name": CONTAINER, "state": {"terminated": {"exitCode": 4}}}]}}
    failure = pod_failure(pod)
    assert not failure.retryable and failure.reason == "ExitCode4"
    assert not exit_codes.DIVERGED.retryable
    assert exit_codes.describe(4).startswith("exit code 4 (Diverged:")
