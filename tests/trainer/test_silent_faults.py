"""Faults that went unsaid (issue 35 item 6): a box outside its image, a 16-bit PNG drawn by inference,
status.json after an S3 outage, a refused train on a completed run, and which attempt wrote each log
record after a SIGKILL and a resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from deformable_detr import exit_codes
from deformable_detr.cli import main
from deformable_detr.data.coco_json import load_source
from deformable_detr.data.dataset import build_dataset
from deformable_detr.runtime import storage
from deformable_detr.runtime.artifacts import staging_dir
from deformable_detr.runtime.status_file import read_status as read_status_file
from deformable_detr.runtime.storage import StorageError
from test_data import box_entry, image_entry, spec_for, write_coco
from test_inference import checkpoint, classmap  # noqa: F401  (fixtures)
from test_inference import tiny_spec as inference_spec
from test_train import tiny_train_spec, train_cli
from train_records import read_log, read_status


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


# ------------------------------------------------------------------ a box outside its image

def test_a_box_entirely_outside_its_image_is_warned_and_counted(tmp_path, logged):
    boxes = [box_entry(1, 1, [2, 2, 6, 6]), box_entry(2, 1, [30, 2, 4, 4]),  # right of a 24 px wide image
             box_entry(3, 1, [2, -9, 4, 5]), box_entry(4, 1, [20, 10, 10, 10])]  # above it; partly inside
    source = write_coco(tmp_path, [image_entry(1)], boxes)
    columns = load_source(source["json_file"], source["image_dir"], num_classes=3)
    assert columns.outside_boxes == 2 and columns.num_boxes == 2
    assert f"{source['json_file']}: skipped 2 box(es) entirely outside their image's width and height" in logged
    dataset = build_dataset(spec_for(source), "val")
    assert dataset.outside_boxes == 2 and len(dataset[0][1]["boxes"]) == 2


def test_without_a_size_in_the_json_a_box_outside_is_dropped_when_read_with_a_warning(tmp_path, logged):
    source = write_coco(tmp_path, [image_entry(1, h=0, w=0)], [box_entry(1, 1, [2, 2, 6, 6]),
                                                               box_entry(2, 1, [30, 2, 4, 4])])
    dataset = build_dataset(spec_for(source), "val")
    assert len(dataset[0][1]["boxes"]) == 1
    path = os.path.join(source["image_dir"], "1.jpg")
    assert f"{path}: dropped 1 box(es) entirely outside the 24x16 image" in logged


# ------------------------------------------------------------------ 16-bit PNG in inference's drawings

def test_inference_draws_a_16_bit_png_with_its_pixels_scaled_not_white(checkpoint, classmap, tmp_path,
                                                                       write_spec):
    folder = tmp_path / "frames"
    folder.mkdir()
    gradient = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(gradient).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode == "I;16"
    spec = inference_spec(tmp_path / "r", checkpoint, [str(folder)], classmap, conf_threshold=1.0)  # no boxes
    assert main(["inference", "-e", write_spec(spec)]) == 0
    drawn = np.asarray(Image.open(tmp_path / "r" / "inference" / "images_annotated" / "deep.png").convert("RGB"))
    expected = np.round(gradient.astype(np.float64) * 255 / 65535)  # what training's scaling gives
    assert drawn.shape == (64, 64, 3) and drawn.mean() < 200  # not the all-white image of before
    assert np.abs(drawn[..., 0].astype(int) - expected).max() <= 1
    assert (drawn[..., 0] == drawn[..., 1]).all() and (drawn[..., 1] == drawn[..., 2]).all()


# ------------------------------------------------------------------ status.json after an S3 outage

def test_after_an_upload_outage_status_json_says_what_is_staged_and_not_uploaded(bucket, tiny_coco, write_spec,
                                                                                  monkeypatch, capsys):
    from deformable_detr.runtime import artifacts

    results = f"{bucket}/run"
    folder = f"{results}/train"
    real_upload = storage.upload_file

    def failing_upload(local, uri, part_size=None):
        if uri.endswith(".pth"):
            raise StorageError(f"{uri}: S3 request failed (ServiceUnavailable)", retryable=True)
        return real_upload(local, uri, part_size=part_size)

    monkeypatch.setattr(artifacts.time, "sleep", lambda _s: None)
    monkeypatch.setattr(artifacts.storage, "upload_file", failing_upload)
    spec = tiny_train_spec(tiny_coco, results, batch_size=8, num_epochs=1)
    spec["dataset"]["val_data_sources"] = []
    assert train_cli(write_spec, spec) == exit_codes.STORAGE_UNAVAILABLE.code
    staged = staging_dir(folder)
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "model_epoch_000_step_00001.pth" in lines[0] and f"kept in {staged}" in lines[0]
    status = read_status_file(staged)
    assert status["state"] == "failed"  # not "completed": the run's checkpoint is not in the results folder
    assert status["not_uploaded"] == ["model_epoch_000_step_00001.pth"]
    assert status.get("last_checkpoint") is None  # none reached the results folder
    assert os.path.isfile(os.path.join(staged, "model_epoch_000_step_00001.pth"))

    # The next run uploads what was staged first; the status it uploads no longer lists it.
    monkeypatch.setattr(artifacts.storage, "upload_file", real_upload)
    assert train_cli(write_spec, spec) == 0
    remote = json.loads(storage.read_bytes(f"{folder}/status.json"))
    assert remote["state"] == "completed" and remote.get("not_uploaded") is None
    assert remote["last_checkpoint"] == f"{folder}/model_epoch_000_step_00001.pth"


# ------------------------------------------------------------------ a refused train on a completed run

def test_a_refused_train_leaves_a_completed_runs_log_status_and_spec_as_they_were(tiny_coco, tmp_path, write_spec,
                                                                                  capsys):
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=8, num_epochs=2)
    spec["dataset"]["val_data_sources"] = []
    assert train_cli(write_spec, spec) == 0
    folder = tmp_path / "r" / "train"
    kept = {name: (folder / name).read_bytes() for name in ("train_log.jsonl", "status.json", "experiment.yaml")}
    capsys.readouterr()
    assert train_cli(write_spec, spec, "train.num_epochs=1", name="fewer.yaml") == exit_codes.BAD_INPUT.code
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("deformable-detr train: error: train.num_epochs: 1 is below the "
                                                   "epoch of the checkpoint to resume"), lines
    for name, content in kept.items():
        assert (folder / name).read_bytes() == content, name


# ------------------------------------------------------------------ attempts after SIGKILL and resume

def test_after_sigkill_and_resume_each_log_record_names_the_attempt_that_wrote_it(tiny_coco, tmp_path, write_spec):
    # Two epochs of two steps, a checkpoint after each epoch: killed after step 3, the resume repeats it.
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=4, num_epochs=2)
    spec["dataset"]["val_data_sources"] = []
    path = write_spec(spec)
    folder = tmp_path / "r" / "train"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DDETR_MSDA_IMPL="reference")
    first = subprocess.Popen([sys.executable, "-m", "deformable_detr", "train", "-e", path], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if (folder / "train_log.jsonl").exists() and any(
                    r["kind"] == "step" and r["step"] == 3 for r in read_log(str(folder))):
                os.kill(first.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        assert first.wait(timeout=60) == -signal.SIGKILL, "the run ended before step 3 could be interrupted"
    finally:
        if first.poll() is None:
            first.kill()
    assert main(["train", "-e", path]) == 0
    records = read_log(str(folder))
    assert [(r["attempt"], r["step"]) for r in records if r["kind"] == "start"] == [(1, 0), (2, 2)]
    steps = [(r["attempt"], r["step"]) for r in records if r["kind"] == "step"]
    assert steps[:3] == [(1, 1), (1, 2), (1, 3)] and steps[-2:] == [(2, 3), (2, 4)]
    assert all("attempt" in r for r in records)
    assert read_status(str(folder))["attempt"] == 2
