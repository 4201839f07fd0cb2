"""Exact resume: a run stopped after epoch 1 and resumed ends with the same weights as an uninterrupted one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from deformable_detr.runtime.checkpoint import LATEST_NAME, load_checkpoint
from train_records import read_log
from test_train import tiny_train_spec, train_cli


def _final(folder) -> dict:
    return load_checkpoint(str(folder / LATEST_NAME))


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    for name, state in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][name]
        assert all(torch.equal(state[k], other[k]) for k in state), name
    assert a["lr_scheduler"] == b["lr_scheduler"]


@pytest.fixture(autouse=True)
def _one_attention_implementation(monkeypatch):
    # Every run (and every worker) uses the same deformable-attention code, whatever kernel builds here.
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(tiny_coco, tmp_path, write_spec):
    # Dropout, random flips and an lr decay at the epoch boundary: each must be restored exactly.
    def spec(folder, **train):
        out = tiny_train_spec(tiny_coco, tmp_path / folder, **train)
        out["dataset"]["val_data_sources"] = []
        return out

    assert train_cli(write_spec, spec("full", num_epochs=2), name="full.yaml") == 0
    uninterrupted = _final(tmp_path / "full" / "train")

    # Stopped after epoch 1 (a run of one epoch), then auto_resume continues in the same folder.
    assert train_cli(write_spec, spec("auto", num_epochs=1), name="a1.yaml") == 0
    assert train_cli(write_spec, spec("auto", num_epochs=2), name="a2.yaml") == 0
    _assert_same_training_state(uninterrupted, _final(tmp_path / "auto" / "train"))
    starts = [r for r in read_log(str(tmp_path / "auto" / "train")) if r["kind"] == "start"]
    assert [(r["epoch"], r["step"]) for r in starts] == [(0, 0), (1, 2)]

    # The explicit path resumes into another folder (auto_resume off) just as exactly.
    first = str(tmp_path / "auto" / "train" / "model_epoch_000_step_00002.pth")
    assert train_cli(write_spec, spec("explicit", num_epochs=2, auto_resume=False,
                                      resume_training_checkpoint_path=first), name="e.yaml") == 0
    _assert_same_training_state(uninterrupted, _final(tmp_path / "explicit" / "train"))


@pytest.mark.slow
def test_sharded_two_process_resume_is_exact_whatever_the_validation_schedule(tiny_coco, tmp_path):
    """FSDP2 shards reload from a full checkpoint; validating after epoch 1 in one run only changes nothing."""
    def launch(folder: str, name: str, **train) -> None:
        spec = tiny_train_spec(tiny_coco, tmp_path / folder, distributed_strategy="ddp_sharded", **train)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec))
        env = dict(os.environ, OMP_NUM_THREADS="1", DDETR_DIST_TIMEOUT_S="120")
        result = subprocess.run([sys.executable, "-m", "deformable_detr", "train", "-e", str(path), "--gpus", "2"],
                                env=env, capture_output=True, text=True, timeout=480)
        assert result.returncode == 0, result.stderr[-3000:]

    launch("full", "full.yaml", num_epochs=2, validation_interval=2)
    launch("resumed", "r1.yaml", num_epochs=1)  # validates after epoch 1 (its last)
    launch("resumed", "r2.yaml", num_epochs=2)
    _assert_same_training_state(_final(tmp_path / "full" / "train"), _final(tmp_path / "resumed" / "train"))
