"""The README's main path on a handful of example images: the loss falls and every output exists.

make-example-data -> convert -> train -> evaluate -> inference -> export, through the real
CLI with the committed tiny spec (only sizes and epochs shrunk).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = os.path.join(ROOT, "examples", "tiny", "spec.yaml")


def cli(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "deformable_detr", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """Run the whole path once in a scratch folder laid out as the README's command lays it out."""
    cwd = tmp_path_factory.mktemp("example")
    # 12 training images overfit in a few dozen steps; 64 px keeps each step cheap.
    cli("make-example-data", "--out", "example_data", "--num-train", "12", "--num-val", "4", "--image-size", "64",
        cwd=cwd)
    small = ["dataset.augmentation.scales=[64]", "dataset.augmentation.train_random_resize=[64]",
             "dataset.augmentation.train_random_crop_min=48", "dataset.augmentation.train_random_crop_max=64",
             "dataset.augmentation.random_resize_max_size=64", "dataset.augmentation.test_random_resize=64",
             "dataset.augmentation.horizontal_flip_prob=0.0", "dataset.workers=0", "dataset.batch_size=4",
             "export.input_width=64", "export.input_height=64"]
    cli("convert", "-e", SPEC, *small, cwd=cwd)
    cli("train", "-e", SPEC, *small, "train.num_epochs=12", "train.checkpoint_interval=12",
        "train.validation_interval=12", "train.optim.lr_steps=[12]", "train.optim.lr=5e-4",
        "train.optim.lr_backbone=5e-4", cwd=cwd)
    evaluate = cli("evaluate", "-e", SPEC, *small, cwd=cwd)
    cli("inference", "-e", SPEC, *small, "inference.conf_threshold=0.0", cwd=cwd)
    cli("export", "-e", SPEC, *small, cwd=cwd)
    return cwd, evaluate.stdout


def test_training_loss_falls(example_run):
    cwd, _ = example_run
    with open(cwd / "example_run/results/train/train_log.jsonl", encoding="utf-8") as fh:
        steps = [r for r in map(json.loads, fh) if r["kind"] == "step"]
    assert len(steps) == 36
    first, last = steps[:3], steps[-3:]
    mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)
    assert mean(last) < 0.8 * mean(first), (mean(first), mean(last))


def test_every_output_exists(example_run):
    cwd, evaluate_stdout = example_run
    results = cwd / "example_run/results"
    shards = sorted(p.name for p in (results / "convert").rglob("*.json"))
    assert len(shards) == 2 * 4 and (results / "convert/stats.txt").exists()  # train + val sources, 4 shards each
    assert (results / "train/dd_model_latest.pth").exists()
    assert (results / "train/model_epoch_011_step_00036.pth").exists()
    assert json.loads((results / "train/status.json").read_text())["state"] == "completed"
    metrics = json.loads((results / "evaluate/results.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0 and "AP50" in evaluate_stdout
    labels = sorted(os.listdir(results / "inference/labels"))
    assert len(labels) == 4 and len(os.listdir(results / "inference/images_annotated")) == 4
    first_line = (results / "inference/labels" / labels[0]).read_text().splitlines()[0].split()
    assert len(first_line) == 16
    model = onnx.load(str(results / "export/model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["pred_logits", "pred_boxes"]
