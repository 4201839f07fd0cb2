"""Progress a person can read (issue 33 item 1): percent done, recent images/s and a finish time from the
recent step rate, not from the first, warm-up-skewed steps; in status.json, the metrics and the log line."""
from __future__ import annotations

import logging

import pytest

from deformable_detr.config.loader import spec_from_dict
from deformable_detr.runtime import progress as progress_module
from deformable_detr.runtime.progress import StepRate, progress
from deformable_detr.runtime.status_file import read_status
from deformable_detr.tasks.train import outputs as outputs_module
from deformable_detr.tasks.train.outputs import TrainOutputs
from deformable_detr.tasks.train.state import Position


def test_the_estimate_leaves_out_warm_up_and_follows_the_recent_rate():
    rate = StepRate(warmup=2, smoothing=0.1)
    rate.add_step(90.0, images=4)  # kernel build and data-loader start-up
    assert rate.eta_seconds(100) is None and rate.images_per_second is None  # nothing to tell yet
    rate.add_step(30.0, images=4)
    assert rate.eta_seconds(100) is None
    for _ in range(10):
        rate.add_step(0.5, images=4)
    assert rate.eta_seconds(100) == pytest.approx(50.0)  # the whole-run mean would say 1,240 s
    assert rate.images_per_second == pytest.approx(8.0)
    rate.add_pause(20.0)  # validation and checkpoint at an epoch's end
    assert rate.eta_seconds(100, epoch_ends_left=2) == pytest.approx(90.0)
    for _ in range(60):  # the pace halves: the estimate follows within a few dozen steps
        rate.add_step(1.0, images=4)
    assert rate.step_seconds == pytest.approx(1.0, rel=0.01)
    assert rate.images_per_second == pytest.approx(4.0, rel=0.01)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_status_json_says_percent_images_per_second_and_eta_of_a_run_with_a_known_step_rate(tmp_path, monkeypatch):
    """A run of 2 epochs x 50 steps of 4 images: 2 warm-up steps of 30 s, then 0.5 s a step, 20 s between
    the epochs. 10 steps into epoch 1: 60% done, 8 images/s, 40 steps x 0.5 s + one epoch end of 20 s left."""
    clock = _Clock()
    monkeypatch.setattr(outputs_module.time, "monotonic", clock)
    spec = spec_from_dict({"results_dir": str(tmp_path), "train": {"num_epochs": 2, "metrics_port": 0},
                           "wandb": {"enable": False}})
    outputs = TrainOutputs(spec, is_main=True)
    outputs.prepare()
    outputs.open(None)
    outputs.training_log.status_every_s = 0.0  # every step rewrites status.json
    outputs.start(Position(), None, world_size=2, steps_per_epoch=50)
    losses = {"loss_ce": 1.0, "loss_bbox": 0.5}

    def step(position: Position, seconds: float) -> None:
        clock.now += seconds
        position.step += 1
        position.batches_done += 1
        outputs.step(position, losses, 1e-4, images=4, step_seconds=seconds, data_wait=0.0, memory_mb=1.0)

    position = Position(epoch=0)
    step(position, 30.0)
    step(position, 30.0)
    status = read_status(str(tmp_path / "train"))
    assert status["percent"] == 2.0 and "eta_seconds" not in status  # warming up: no estimate rather than a wrong one
    assert outputs.progress_note() == "; run 2.0% done, warming up"
    for _ in range(48):
        step(position, 0.5)
    clock.now += 20.0  # validation and the checkpoint
    position = Position(epoch=1, step=position.step)
    for _ in range(10):
        step(position, 0.5)
    status = read_status(str(tmp_path / "train"))
    assert status["percent"] == 60.0
    assert status["images_per_second"] == 8.0
    assert status["eta_seconds"] == pytest.approx(40.0)
    assert status["estimated_finish_time"].endswith("Z")
    assert outputs.progress_note() == "; run 60.0% done, ETA 40s"
    outputs.finish("completed")
    status = read_status(str(tmp_path / "train"))
    assert status["percent"] == 100.0 and status["eta_seconds"] == 0.0 and status["state"] == "completed"


def test_the_progress_line_gives_no_rate_until_the_warm_up_items_are_done(monkeypatch, caplog):
    """The fault the issue saw: a slow first step made the line promise hours."""
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False)
    durations = iter([100.0, 20.0] + [1.0] * 30)
    caplog.set_level(logging.INFO, logger="deformable_detr.progress")
    for _ in progress(range(32), desc="epoch 0 of 0..0", log_every_s=10.0, note=lambda: "; run 1% done"):
        clock.now += next(durations)
    lines = [r.getMessage() for r in caplog.records if r.name == "deformable_detr.progress"]
    assert lines[0] == "epoch 0 of 0..0: 1/32 it, warming up (no rate yet); run 1% done"
    assert lines[1] == "epoch 0 of 0..0: 2/32 it, warming up (no rate yet); run 1% done"
    assert lines[2] == "epoch 0 of 0..0: 12/32 it, 1.00 it/s (last 30s), ETA 20s; run 1% done"


def test_on_a_terminal_the_bar_says_warming_up_and_its_rate_starts_after(monkeypatch, capsys):
    import re
    import time

    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: True)
    seen = []
    for item in progress(range(5), desc="epoch 0 of 0..0"):
        seen.append(item)
        if item == 0:
            time.sleep(1.0)  # a slow first step: with it the rate would be at most 5 it/s
    assert seen == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "warming up" in err and "2/5" in err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("epoch 0 of 0..0: 100%") and "5/5" in final
    assert float(re.search(r"([0-9.]+)it/s", final).group(1)) > 50  # the 3 items after the warm-up only
