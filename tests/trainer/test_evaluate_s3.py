"""evaluate and inference with the checkpoint and the results in S3 (moto's server on 127.0.0.1, over HTTP)."""
from __future__ import annotations

import json

import pytest
import torch

from deformable_detr.cli import main
from deformable_detr.config.loader import spec_from_dict
from deformable_detr.runtime import storage
from deformable_detr.runtime.checkpoint_io import save_object

TINY_MODEL = {"backbone": "resnet_18", "num_queries": 10, "num_feature_levels": 1, "return_interm_indices": [3],
              "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64,
              "enc_n_points": 2, "dec_n_points": 2, "num_select": 20}


@pytest.fixture
def s3_checkpoint(bucket) -> str:
    from deformable_detr.model import build_model

    torch.manual_seed(0)
    model, _, _ = build_model(spec_from_dict({"model": TINY_MODEL, "dataset": {"num_classes": 4}}))
    path = f"{bucket}/train/model_epoch_000_step_00001.pth"
    save_object({"model": model.state_dict()}, path, key="k3y")
    return path


def _dataset(**sources) -> dict:
    return {"num_classes": 4, "batch_size": 2, "workers": 0, "pin_memory": False, **sources,
            "augmentation": {"test_random_resize": 64, "random_resize_max_size": 64, "fixed_padding": False}}


def test_evaluate_reads_and_writes_s3(tiny_coco, bucket, s3_checkpoint, write_spec):
    spec = {"model": TINY_MODEL, "dataset": _dataset(test_data_sources=tiny_coco["val"]),
            "evaluate": {"checkpoint": s3_checkpoint}}
    assert main(["evaluate", "-e", write_spec(spec), "-r", f"{bucket}/run", "-k", "k3y"]) == 0
    results = json.loads(storage.read_bytes(f"{bucket}/run/evaluate/results.json"))
    detections = json.loads(storage.read_bytes(f"{bucket}/run/evaluate/detections.json"))
    assert results["num_detections"] == len(detections) == 4 * 20 and "per_class" in results


def test_inference_writes_s3(tiny_coco, bucket, s3_checkpoint, write_spec, tmp_path):
    classmap = tmp_path / "classmap.txt"
    classmap.write_text("car\nperson\nbicycle\n")
    spec = {"model": TINY_MODEL,
            "dataset": _dataset(infer_data_sources={"image_dir": [tiny_coco["val"]["image_dir"]],
                                                    "classmap": str(classmap)}),
            "inference": {"checkpoint": s3_checkpoint, "conf_threshold": 0.0}}
    assert main(["inference", "-e", write_spec(spec), "-r", f"{bucket}/run", "-k", "k3y"]) == 0
    written = sorted(storage.list_files(f"{bucket}/run/inference/"))
    labels = [p for p in written if "/labels/" in p]
    drawn = [p for p in written if "/images_annotated/" in p]
    assert len(labels) == len(drawn) == 4
    assert storage.read_bytes(labels[0]).decode().split("\n")[0].split()[0] in ("car", "person", "bicycle")
    assert storage.read_bytes(drawn[0])[:2] == b"\xff\xd8"  # a JPEG, as the input was
