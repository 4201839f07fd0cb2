"""A TensorRT engine end to end (GPU + tensorrt only): export -> gen_trt_engine -> TrtDetector,
evaluate and inference with trt_engine=. Without a GPU and tensorrt these tests skip."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from deformable_detr.cli import main
from deformable_detr.export.onnx_export import ExportedDetector
from deformable_detr.export.trt import missing_requirements

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(bool(missing_requirements()),
                                 reason=f"needs tensorrt and a CUDA GPU: {'; '.join(missing_requirements())}")]

MODEL = {"backbone": "resnet_18", "num_queries": 6, "num_feature_levels": 2, "return_interm_indices": [3, 4],
         "enc_layers": 1, "dec_layers": 2, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 32, "num_select": 12}
NUM_CLASSES = 4
SIZE = 64  # tiny_coco's images are 64x64
# TensorRT builds fp32 engines with TF32 allowed: about 1e-3 relative off the fp32 CPU reference.
ATOL = 2e-2


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


@pytest.fixture(scope="module")
def trained(perturbed_checkpoint):
    return perturbed_checkpoint({"model": MODEL, "dataset": {"num_classes": NUM_CLASSES}})


def build_engine(write_spec, folder, checkpoint: str, on_cpu: bool, batch_size: int) -> str:
    onnx_file, engine_file = str(folder / "model.onnx"), str(folder / "model.engine")
    export = {"checkpoint": checkpoint, "onnx_file": onnx_file, "on_cpu": on_cpu, "batch_size": batch_size,
              "input_height": SIZE, "input_width": SIZE}
    spec = {"results_dir": str(folder), "model": MODEL, "dataset": {"num_classes": NUM_CLASSES}, "export": export}
    assert main(["export", "-e", write_spec(spec, "export.yaml")]) == 0
    gen = {"onnx_file": onnx_file, "trt_engine": engine_file, "input_height": SIZE, "input_width": SIZE,
           "batch_size": batch_size,
           "tensorrt": {"data_type": "fp32", "min_batch_size": 1, "opt_batch_size": 2, "max_batch_size": 4}}
    spec = {"results_dir": str(folder), "gen_trt_engine": gen}
    assert main(["gen_trt_engine", "-e", write_spec(spec, "gen.yaml")]) == 0
    return engine_file


ENGINES = [pytest.param(False, -1, id="plugin-dynamic"), pytest.param(True, -1, id="plain-dynamic"),
           pytest.param(False, 2, id="plugin-fixed2")]


@pytest.mark.parametrize("on_cpu, batch_size", ENGINES)
def test_engine_matches_pytorch(on_cpu, batch_size, trained, write_spec, tmp_path):
    """Batches below, inside and above the profile (split, and padded for a fixed batch)."""
    from deformable_detr.export.trt import TrtDetector

    model, checkpoint = trained
    detector = TrtDetector(build_engine(write_spec, tmp_path, checkpoint, on_cpu, batch_size), "cuda")
    expected_range = (2, 2) if batch_size == 2 else (1, 4)
    assert detector.io.batch_range == expected_range
    reference = ExportedDetector(model).eval()
    torch.manual_seed(1)
    for batch in (1, 3, 5):
        images = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            logits, boxes = reference(images)
        outputs = detector(images.cuda(), None)
        assert outputs["pred_logits"].shape == logits.shape and outputs["pred_boxes"].shape == boxes.shape
        assert (outputs["pred_logits"].cpu() - logits).abs().max() < ATOL
        assert (outputs["pred_boxes"].cpu() - boxes).abs().max() < ATOL


@pytest.fixture(scope="module")
def plugin_engine(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")

    def write(spec: dict, name: str) -> str:
        import yaml

        path = folder / name
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    return build_engine(write, folder, trained[1], on_cpu=False, batch_size=-1)


def test_evaluate_with_the_engine_writes_metrics(plugin_engine, tiny_coco, write_spec, results_dir):
    spec = {"results_dir": str(results_dir), "model": MODEL,
            "dataset": {"num_classes": NUM_CLASSES, "batch_size": 3, "workers": 0,
                        "test_data_sources": tiny_coco["val"],
                        "augmentation": {"test_random_resize": 32, "random_resize_max_size": 32,
                                         "fixed_padding": True}},
            "evaluate": {"trt_engine": plugin_engine}}
    assert main(["evaluate", "-e", write_spec(spec)]) == 0
    report = json.loads((results_dir / "evaluate" / "results.json").read_text())
    assert report["trt_engine"] == plugin_engine and report["num_images"] == 4
    assert report["num_detections"] == 4 * MODEL["num_select"]
    assert -1.0 <= report["AP"] <= 1.0 and set(report["per_class"])
    detections = json.loads((results_dir / "evaluate" / "detections.json").read_text())
    assert len({d["image_id"] for d in detections}) == 4
    assert all(0 <= d["category_id"] < NUM_CLASSES and d["bbox"][2] >= 0 for d in detections)


def test_evaluate_refuses_a_size_the_engine_was_not_built_for(plugin_engine, tiny_coco, write_spec, results_dir,
                                                             capsys):
    spec = {"results_dir": str(results_dir), "model": MODEL,
            "dataset": {"num_classes": NUM_CLASSES, "test_data_sources": tiny_coco["val"], "workers": 0},
            "evaluate": {"trt_engine": plugin_engine, "input_width": 128}}
    assert main(["evaluate", "-e", write_spec(spec)]) == 2
    assert "evaluate.input_width: 128, but the engine was built for 64" in capsys.readouterr().err


def test_inference_with_the_engine_writes_labels(plugin_engine, tiny_coco, write_spec, results_dir, tmp_path):
    folder = tmp_path / "frames"
    shutil.copytree(tiny_coco["val"]["image_dir"], folder)
    classmap = tmp_path / "classmap.txt"
    classmap.write_text("car\nperson\nbicycle\n")
    spec = {"results_dir": str(results_dir), "model": MODEL,
            "dataset": {"num_classes": NUM_CLASSES, "batch_size": 2, "workers": 0,
                        "infer_data_sources": {"image_dir": [str(folder)], "classmap": str(classmap)}},
            "inference": {"trt_engine": plugin_engine, "conf_threshold": 0.0}}
    assert main(["inference", "-e", write_spec(spec)]) == 0
    labels = sorted((results_dir / "inference" / "labels").glob("*.txt"))
    assert len(labels) == 4
    for label in labels:
        for line in label.read_text().splitlines():
            fields = line.split()
            assert len(fields) == 16 and 0 <= float(fields[4]) <= float(fields[6]) <= SIZE
    assert len(list((results_dir / "inference" / "images_annotated").iterdir())) == 4
