"""Exact resume after a mid-epoch stop: SIGTERM (a checkpoint mid-epoch) and SIGKILL (the last
epoch checkpoint), with 0 and 2 loader workers, end with the weights of an uninterrupted run.

Checkpoints are written per epoch (train.checkpoint_interval counts epochs; the spec has no
step interval), so a SIGKILL mid-epoch resumes from the end of the previous epoch and
repeats that epoch's first batches: the comparison is still against the uninterrupted run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from deformable_detr.data.samplers import ResumableSampler, sample_seed
from deformable_detr.runtime.checkpoint import LATEST_NAME, load_checkpoint
from train_records import read_log, read_status
from test_resume import _assert_same_training_state
from test_train import sigterm_after_steps, step_losses, tiny_train_spec, train_cli


@pytest.fixture(autouse=True)
def _one_attention_implementation(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def _spec(tiny_coco, root, workers: int = 0, **train) -> dict:
    spec = tiny_train_spec(tiny_coco, root, batch_size=2, **train)  # 4 steps per epoch
    spec["dataset"]["val_data_sources"] = []
    spec["dataset"]["workers"] = workers
    return spec


def _final(root) -> dict:
    return load_checkpoint(str(root / "train" / LATEST_NAME))


@pytest.fixture(scope="module")
def uninterrupted(tiny_coco, tmp_path_factory):
    """A two-epoch run, never stopped (workers 0): its final checkpoint and per-step losses."""
    root = tmp_path_factory.mktemp("uninterrupted")
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tiny_coco, root / "results")))
    from deformable_detr.cli import main

    os.environ["DDETR_MSDA_IMPL"] = "reference"
    try:
        assert main(["train", "-e", str(path)]) == 0
    finally:
        os.environ.pop("DDETR_MSDA_IMPL", None)
    return _final(root / "results"), step_losses(root / "results" / "train")


def test_sampler_skips_without_reading_and_seeds_per_sample():
    base = list(range(10))
    sampler = ResumableSampler(base, seed=3, rank=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip(4)
    assert len(sampler) == 6 and list(sampler) == full[4:]
    assert [s.seed for s in list(sampler)] == [sample_seed(3, 2, p + 1) for p in range(4, 10)]  # one process: place p + rank
    sampler.set_epoch(3)  # a new epoch starts from its first sample
    assert len(sampler) == 10


def test_sigterm_mid_epoch_then_resume_matches_the_uninterrupted_run(uninterrupted, tiny_coco, tmp_path, write_spec,
                                                                     capfd):
    spec = _spec(tiny_coco, tmp_path / "r")
    folder = tmp_path / "r" / "train"

    with sigterm_after_steps(folder, 2):
        assert train_cli(write_spec, spec) == 143
    stopped = load_checkpoint(read_status(str(folder))["last_checkpoint"])
    assert stopped["epoch_finished"] is False and 2 <= stopped["batches_done"] < 4 and stopped["epoch"] == 0
    assert train_cli(write_spec, spec) == 0
    final, losses = uninterrupted
    assert step_losses(folder) == losses  # the same numbers at every step, the first after resume too
    _assert_same_training_state(final, _final(tmp_path / "r"))
    # Epochs are 0-based in log lines as in file names and train_log.jsonl; status.json says which is which.
    err = capfd.readouterr().err
    assert "epoch 1 of 0..1: done" in err and "epoch 2 " not in err
    assert sorted(n for n in os.listdir(folder) if n.startswith("model_epoch_"))[-1] == "model_epoch_001_step_00008.pth"
    assert {r["epoch"] for r in read_log(str(folder)) if r["kind"] == "step"} == {0, 1}
    status = read_status(str(folder))
    assert (status["epoch"], status["epochs_completed"], status["epoch_index"]) == (2, 2, 1)
    starts = [r for r in read_log(str(folder)) if r["kind"] == "start"]
    assert [r["resumed_from"] is None for r in starts] == [True, False] and starts[1]["batches_done"] >= 2


def _launch(spec: dict, path, workers_env: dict | None = None) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(spec))
    # As many threads as the in-process reference run: a float sum's order depends on it.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), DDETR_MSDA_IMPL="reference",
               **(workers_env or {}))
    # A session of its own: signals go to the whole process group, as timeout, Slurm and Ctrl-C send them.
    return subprocess.Popen([sys.executable, "-m", "deformable_detr", "train", "-e", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_steps(folder, count: int, run: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        if (folder / "train_log.jsonl").exists() and len(step_losses(folder)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {count} within {timeout}s: {run.poll()}")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_process_group_sigterm_and_sigkill_mid_epoch_resume_exactly(uninterrupted, tiny_coco, tmp_path, workers):
    final, losses = uninterrupted
    # SIGTERM to the whole group (loader workers included): a checkpoint and exit 143, no traceback.
    spec = _spec(tiny_coco, tmp_path / "term", workers=workers)
    folder = tmp_path / "term" / "train"
    run = _launch(spec, tmp_path / "term.yaml")
    _wait_for_steps(folder, 1, run)
    os.killpg(run.pid, signal.SIGTERM)
    _out, err = run.communicate(timeout=300)
    assert run.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err
    assert load_checkpoint(read_status(str(folder))["last_checkpoint"])["epoch_finished"] is False
    run = _launch(spec, tmp_path / "term.yaml")
    assert run.wait(timeout=300) == 0, run.stderr.read()[-3000:]
    assert step_losses(folder) == losses
    _assert_same_training_state(final, _final(tmp_path / "term"))

    # SIGKILL in epoch 1: the epoch-0 checkpoint is the newest complete one. A torn newer checkpoint
    # and a temporary file of a save in progress are what a kill during a save leaves.
    spec = _spec(tiny_coco, tmp_path / "kill", workers=workers)
    folder = tmp_path / "kill" / "train"
    run = _launch(spec, tmp_path / "kill.yaml")
    _wait_for_steps(folder, 5, run)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    run.stdout.close(), run.stderr.close()
    assert run.returncode == -signal.SIGKILL
    assert os.path.exists(folder / "model_epoch_000_step_00004.pth")
    (folder / "model_epoch_001_step_00007.pth").write_bytes(b"torn")
    (folder / ".model_epoch_001_step_00008.pth.x1.tmp").write_bytes(b"partial")
    run = _launch(spec, tmp_path / "kill.yaml")
    _out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert "skipping" in err and "model_epoch_001_step_00007.pth" in err
    assert not (folder / ".model_epoch_001_step_00008.pth.x1.tmp").exists()
    _assert_same_training_state(final, _final(tmp_path / "kill"))
    assert [r["loss"] for r in read_log(str(folder)) if r["kind"] == "step"][-4:] == losses[-4:]
