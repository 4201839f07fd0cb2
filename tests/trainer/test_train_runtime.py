"""Training's runtime pieces with a tiny stand-in model: checkpoints, RNG, optimizer groups, SIGTERM, logs."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from deformable_detr.config import spec_from_dict
from deformable_detr.errors import UsageError
from deformable_detr.runtime import checkpoint
from deformable_detr.runtime.optim import build_optimizer, build_scheduler, param_groups
from deformable_detr.runtime.signals import StopRequest
from deformable_detr.runtime.status_file import STATUS_FIELDS
from deformable_detr.runtime.training_log import TrainingLog
from train_records import read_log, read_status


class StandIn(nn.Module):
    """Parameter names laid out as Deformable DETR's are."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleList([nn.Sequential(nn.Linear(2, 2))])
        self.input_proj = nn.Linear(2, 2)
        self.transformer = nn.Module()
        self.transformer.sampling_offsets = nn.Linear(2, 2)
        self.transformer.reference_points = nn.Linear(2, 2)
        self.class_embed = nn.Linear(2, 3)


def _spec(**train):
    return spec_from_dict({"train": train})


def test_checkpoint_names_follow_tao():
    assert checkpoint.checkpoint_name(3, 120) == "model_epoch_003_step_00120.pth"
    assert checkpoint.parse_checkpoint_name("/x/model_epoch_012_step_01234.pth") == (12, 1234)
    assert checkpoint.parse_checkpoint_name("dd_model_latest.pth") is None
    assert checkpoint.parse_checkpoint_name(".model_epoch_001_step_00010.pth.abc.tmp") is None


def test_save_writes_numbered_file_and_latest_and_resume_finds_newest(tmp_path):
    folder = str(tmp_path)
    assert checkpoint.find_resume_checkpoint(folder) is None
    for epoch, step in [(0, 5), (1, 10), (9, 8)]:
        checkpoint.save_checkpoint({"epoch": epoch, "step": step, "model": {"w": torch.full((2,), float(step))}},
                                   folder)
    (tmp_path / ".model_epoch_005_step_99999.pth.x.tmp").write_bytes(b"half")  # a crashed write
    newest = checkpoint.find_resume_checkpoint(folder)
    assert os.path.basename(newest) == "model_epoch_001_step_00010.pth"  # the most steps wins
    latest = checkpoint.load_checkpoint(str(tmp_path / checkpoint.LATEST_NAME))
    assert latest["step"] == 8  # the pointer follows the last save
    assert [r.step for r in checkpoint.list_checkpoints(folder)] == [5, 8, 10]


def test_latest_pointer_survives_a_failed_save(tmp_path):
    folder = str(tmp_path)
    checkpoint.save_checkpoint({"epoch": 0, "step": 1, "model": {}}, folder)
    with pytest.raises(Exception):
        checkpoint.save_checkpoint({"epoch": 1, "step": 2, "model": {"bad": lambda: None}}, folder)
    assert checkpoint.load_checkpoint(str(tmp_path / checkpoint.LATEST_NAME))["step"] == 1
    assert sorted(os.listdir(folder)) == ["dd_model_latest.pth", "model_epoch_000_step_00001.pth"]


def test_encrypted_checkpoint_needs_its_key(tmp_path):
    path = checkpoint.save_checkpoint({"epoch": 0, "step": 3, "model": {"w": torch.ones(2)}}, str(tmp_path),
                                      key="secret")
    with pytest.raises(UsageError, match="encrypted"):
        checkpoint.load_checkpoint(path)
    assert torch.equal(checkpoint.load_checkpoint(path, key="secret")["model"]["w"], torch.ones(2))


def test_rng_state_round_trip():
    state = checkpoint.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_param_groups_follow_deformable_detr():
    spec = _spec(optim={"lr": 1e-3, "lr_backbone": 1e-4, "lr_linear_proj_mult": 0.5})
    model = StandIn()
    optimizer = build_optimizer(model, spec)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["backbone"]["lr"] == pytest.approx(1e-4)
    assert by_name["linear_proj"]["lr"] == pytest.approx(5e-4)
    assert by_name["rest"]["lr"] == pytest.approx(1e-3)
    assert len(by_name["linear_proj"]["params"]) == 4 and len(by_name["backbone"]["params"]) == 2
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert isinstance(build_optimizer(model, _spec(optim={"optimizer": "SGD"})), torch.optim.SGD)


def test_frozen_parameters_are_left_out():
    model = StandIn()
    for param in list(model.backbone.parameters()) + list(model.input_proj.parameters()):
        param.requires_grad_(False)
    groups = param_groups(model, _spec().train.optim, ["backbone.0"], ["sampling_offsets", "reference_points"])
    assert {g["name"] for g in groups} == {"rest", "linear_proj"}
    assert sum(len(g["params"]) for g in groups) == 6
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(UsageError, match="nothing to train"):
        build_optimizer(model, _spec())


@pytest.mark.parametrize("optim,expected", [
    ({"lr_scheduler": "MultiStep", "lr_steps": [2, 4], "lr_decay": 0.1}, [1, 1, 0.1, 0.1, 0.01]),
    ({"lr_scheduler": "StepLR", "lr_step_size": 2, "lr_decay": 0.5}, [1, 1, 0.5, 0.5, 0.25]),
])
def test_schedules_step_per_epoch(optim, expected):
    spec = _spec(optim={"lr": 1.0, **optim})
    optimizer = build_optimizer(StandIn(), spec)
    scheduler = build_scheduler(optimizer, spec.train.optim)
    lrs = []
    for _ in expected:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(expected)


def test_sigterm_raises_the_stop_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) == before


def test_training_log_and_status(tmp_path):
    log = TrainingLog(str(tmp_path), num_epochs=2)
    log.update_status(epoch=1)
    log.log_step(epoch=0, step=1, losses={"loss_ce": torch.tensor(1.5), "loss_bbox": 0.5}, lr=1e-4, images_per_s=3.0)
    log.log_validation(epoch=0, step=1, metrics={"mAP": 0.25, "val_loss": float("nan")})
    log.update_status(last_checkpoint="/x/model_epoch_000_step_00001.pth", state="completed")
    log.close()
    records = read_log(str(tmp_path))
    assert records[0]["kind"] == "step" and records[0]["loss"] == pytest.approx(2.0)
    assert records[0]["loss_ce"] == pytest.approx(1.5) and records[0]["lr"] == 1e-4
    assert records[1]["kind"] == "validation" and records[1]["val_loss"] is None
    status = read_status(str(tmp_path))
    expected = {"num_epochs": 2, "epoch": 1, "epochs_completed": 1, "epoch_index": 0, "step": 1,
                "last_loss": 2.0, "last_map": 0.25,
                "last_checkpoint": "/x/model_epoch_000_step_00001.pth", "state": "completed",
                "attempt": 1, "skipped_samples": 0, "not_uploaded": None}
    assert {name: status[name] for name in expected} == expected
    assert set(status) == set(STATUS_FIELDS)  # every field written, the rest at their defaults
    with pytest.raises(ValueError):
        TrainingLog(str(tmp_path), 1).update_status(state="exploded")
    # A restarted run starts from what the last one reported.
    again = TrainingLog(str(tmp_path), num_epochs=3)
    assert (again.status.last_map, again.status.step, again.status.num_epochs) == (0.25, 1, 3)
    again.close()
