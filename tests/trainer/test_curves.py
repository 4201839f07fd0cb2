"""Curves (issue 33 item 2): rank 0 writes TensorBoard event files beside train_log.jsonl, from the same
scalars that go to Weights & Biases (runtime/scalars.py); read back here with TensorBoard's own reader."""
from __future__ import annotations

import pytest

from deformable_detr.runtime.scalars import step_scalars, validation_scalars
from deformable_detr.runtime.tensorboard_log import EVENTS_DIR
from train_records import read_log
from test_train import tiny_train_spec, train_cli


def read_events(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the event files in `folder`, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_the_scalar_feed_names_each_value_once():
    assert step_scalars({"loss_ce": 1.0, "loss_bbox": 0.5}, 1e-4, 2, images_per_s=8.0, data_wait_seconds=0.01) == {
        "train/loss_ce": 1.0, "train/loss_bbox": 0.5, "train/loss": 1.5, "train/lr": 1e-4, "train/epoch": 2.0,
        "train/images_per_s": 8.0, "train/data_wait_seconds": 0.01}
    assert validation_scalars({"mAP": 0.5, "mAP50": 0.75, "per_class_AP": {"car": 0.4, "bus": None}}) == {
        "val/mAP": 0.5, "val/mAP50": 0.75, "val/per_class_AP/car": 0.4}


def test_training_writes_tensorboard_event_files_beside_its_log(tiny_coco, tmp_path, write_spec, monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")
    assert train_cli(write_spec, tiny_train_spec(tiny_coco, tmp_path / "results")) == 0
    folder = tmp_path / "results" / "train"
    curves = read_events(folder / EVENTS_DIR)
    records = read_log(str(folder))
    steps = [r for r in records if r["kind"] == "step"]
    for term in ("loss_ce", "loss_bbox", "loss_giou", "loss", "lr", "images_per_s", "data_wait_seconds"):
        assert [step for step, _ in curves[f"train/{term}"]] == [r["step"] for r in steps], term
        assert [value for _, value in curves[f"train/{term}"]] == pytest.approx([r[term] for r in steps], rel=1e-5)
    # Every parameter group's learning rate; the main group's is train/lr.
    assert [v for _, v in curves["train/lr_rest"]] == pytest.approx([r["lr"] for r in steps])
    assert [v for _, v in curves["train/lr_backbone"]] == pytest.approx([r["lr"] / 10 for r in steps])
    assert "train/lr_linear_proj" in curves
    validations = [r for r in records if r["kind"] == "validation"]
    for metric in ("mAP", "mAP50"):
        assert curves[f"val/{metric}"] == [(r["step"], pytest.approx(r[metric], abs=1e-6)) for r in validations]


def test_without_the_tensorboard_package_one_line_and_no_event_files(tmp_path, monkeypatch, caplog):
    import logging
    import sys

    from deformable_detr.runtime.tensorboard_log import open_events

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as when it is not installed
    caplog.set_level(logging.INFO, logger="deformable_detr.tensorboard")
    assert open_events(str(tmp_path), 1) is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == "deformable_detr.tensorboard"]
    assert line.startswith("no TensorBoard event files: the tensorboard package is not installed")
    assert list(tmp_path.iterdir()) == []
