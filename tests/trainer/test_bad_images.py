"""Unusable training images (issue 35 item 5): a corrupt, empty or wrongly sized image is skipped with a
warning naming the file, replaced by the next usable one, counted in train_log.jsonl and status.json;
past dataset.max_skipped_share training stops in one line after saving a checkpoint (exit 2);
dataset.verify_images checks every image before the first step."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from deformable_detr import exit_codes
from deformable_detr.config.schema import DatasetConfig
from deformable_detr.runtime.checkpoint import list_checkpoints
from test_train import tiny_train_spec, train_cli
from train_records import read_log, read_status


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def _spoiled_copy(tiny_coco, tmp_path) -> tuple[dict, dict[str, str]]:
    """A copy of the tiny training set with three unusable images: kind -> path."""
    folder = tmp_path / "train"
    shutil.copytree(tiny_coco["train"]["image_dir"], folder / "images")
    coco = json.loads(open(tiny_coco["train"]["json_file"]).read())
    names = [image["file_name"] for image in coco["images"]]
    bad = {"corrupt": str(folder / "images" / names[1]), "empty": str(folder / "images" / names[4]),
           "size": str(folder / "images" / names[6])}
    with open(bad["corrupt"], "r+b") as fh:  # a valid header, then garbage: decoding fails
        fh.seek(40)
        fh.write(os.urandom(200))
        fh.truncate(240)
    open(bad["empty"], "wb").close()
    coco["images"][6]["width"] += 5  # the JSON's width no longer matches the pixels
    (folder / "annotations.json").write_text(json.dumps(coco))
    return {"image_dir": str(folder / "images"), "json_file": str(folder / "annotations.json")}, bad


def _spec(tiny_coco, tmp_path, source: dict, **dataset) -> dict:
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=4, num_epochs=1)
    spec["dataset"].update(train_data_sources=[source], val_data_sources=[], **dataset)
    return spec


def test_the_documented_default_share_is_five_percent():
    assert DatasetConfig().max_skipped_share == 0.05 and DatasetConfig().verify_images is False


def test_unusable_images_are_skipped_named_and_counted_and_training_goes_on(tiny_coco, tmp_path, write_spec,
                                                                           capsys):
    source, bad = _spoiled_copy(tiny_coco, tmp_path)
    spec = _spec(tiny_coco, tmp_path, source, max_skipped_share=0.5)  # 3 of 8 images: within 50%
    assert train_cli(write_spec, spec) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "/__w/" not in err  # no torchvision build path
    warnings = [line for line in err.splitlines() if "skipping a training image" in line]
    assert len(warnings) == 3
    assert any(f"{bad['empty']}: the file is empty (0 bytes); expected an image" in line for line in warnings)
    assert any(bad["corrupt"] in line and "cannot decode image" in line for line in warnings)
    assert any(bad["size"] in line and "the annotation file lists width" in line for line in warnings)
    folder = tmp_path / "r" / "train"
    records = read_log(str(folder))
    skipped = [r for r in records if r["kind"] == "skipped"]
    assert sorted(path for r in skipped for path in r["images"]) == sorted(bad.values())
    assert skipped[-1]["skipped_samples"] == 3
    # Every step still trained a full batch: the skipped samples were replaced, not dropped.
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2]
    status = read_status(str(folder))
    assert status["state"] == "completed" and status["skipped_samples"] == 3


def test_past_the_share_training_stops_in_one_line_after_saving_a_checkpoint(tiny_coco, tmp_path, write_spec,
                                                                             capsys):
    source, bad = _spoiled_copy(tiny_coco, tmp_path)
    spec = _spec(tiny_coco, tmp_path, source)  # the default 5%: one of 8 images is already too many
    assert train_cli(write_spec, spec) == exit_codes.BAD_INPUT.code
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    folder = tmp_path / "r" / "train"
    steps = [ref.step for ref in list_checkpoints(str(folder))]
    assert len(steps) == 1  # the work up to the step that went past the share is kept
    assert len(lines) == 1 and lines[0].startswith(
        "deformable-detr train: error: dataset.max_skipped_share: ") and "of 8 training images could not be used, " \
        f"more than the 5% allowed (first: " in lines[0], lines
    assert any(f"(first: {path})" in lines[0] for path in bad.values())
    assert lines[0].endswith(f"saved a checkpoint at epoch 0 (0-based), step {steps[0]}")
    status = read_status(str(folder))
    assert status["state"] == "failed" and status["skipped_samples"] >= 1


def test_verify_images_refuses_the_run_before_the_first_step_naming_the_files(tiny_coco, tmp_path, write_spec,
                                                                             capsys):
    source, bad = _spoiled_copy(tiny_coco, tmp_path)
    spec = _spec(tiny_coco, tmp_path, source, verify_images=True, max_skipped_share=0.5)
    assert train_cli(write_spec, spec) == exit_codes.BAD_INPUT.code
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "deformable-detr train: error: dataset.verify_images: 3 of 8 training images cannot be used: "), lines
    assert all(path in lines[0] for path in bad.values())
    assert not (tmp_path / "r" / "train" / "train_log.jsonl").exists()  # no step taken, nothing recorded


def test_two_ranks_skip_in_step_and_count_the_same_files(tiny_coco, tmp_path, write_spec):
    """Under torchrun each rank replaces its own unusable samples: batches keep their size, so the ranks'
    collectives stay in step, and every rank counts the same set of files (rank 0 reports it)."""
    source, bad = _spoiled_copy(tiny_coco, tmp_path)
    spec = _spec(tiny_coco, tmp_path, source, max_skipped_share=0.5)
    spec["dataset"]["batch_size"] = 2
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", DDETR_DIST_TIMEOUT_S="120", DDETR_MSDA_IMPL="reference")
    done = subprocess.run([sys.executable, "-m", "deformable_detr", "train", "-e", write_spec(spec), "--gpus", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "r" / "train"
    records = read_log(str(folder))
    assert sorted(path for r in records if r["kind"] == "skipped" for path in r["images"]) == sorted(bad.values())
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2]
    assert read_status(str(folder))["skipped_samples"] == 3
