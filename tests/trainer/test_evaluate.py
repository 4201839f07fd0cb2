"""`deformable-detr evaluate` end to end on the tiny COCO set, with a tiny real model."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
import yaml

from deformable_detr.cli import main
from deformable_detr.config.loader import spec_from_dict
from deformable_detr.data.coco_eval import STAT_NAMES, evaluate_coco
from deformable_detr.runtime.checkpoint_io import save_object

TINY_MODEL = {"backbone": "resnet_18", "num_queries": 10, "num_feature_levels": 1, "return_interm_indices": [3],
              "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64,
              "enc_n_points": 2, "dec_n_points": 2, "num_select": 20}


def tiny_spec(tiny_coco: dict, results_dir, checkpoint: str, **evaluate) -> dict:
    return {
        "results_dir": str(results_dir),
        "model": dict(TINY_MODEL),
        "dataset": {"num_classes": tiny_coco["num_classes"], "batch_size": 2, "workers": 0, "pin_memory": False,
                    "test_data_sources": tiny_coco["val"],
                    "augmentation": {"test_random_resize": 64, "random_resize_max_size": 64, "fixed_padding": False}},
        "evaluate": {"checkpoint": checkpoint, **evaluate},
    }


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A seeded tiny model's weights and our checkpoint of them (training's {"model": ...} layout)."""
    from deformable_detr.model import build_model

    torch.manual_seed(0)
    model, _, _ = build_model(spec_from_dict({"model": TINY_MODEL, "dataset": {"num_classes": 4}}))
    state = model.state_dict()
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    save_object({"model": state, "epoch": 0, "step": 1}, path)
    return state, path


def _evaluate(write_spec, spec: dict, *extra: str) -> int:
    return main(["evaluate", "-e", write_spec(spec), *extra])


def _error_line(stderr: str) -> str:
    """The CLI's one error line (log lines of the run may precede it on stderr)."""
    lines = [line for line in stderr.splitlines() if line.startswith("deformable-detr evaluate:")]
    assert len(lines) == 1, stderr
    assert stderr.strip().splitlines()[-1] == lines[0], "the error message runs over several lines"
    return lines[0]


def _outputs(results_dir) -> tuple[dict, list]:
    folder = results_dir / "evaluate"
    return (json.loads((folder / "results.json").read_text()),
            json.loads((folder / "detections.json").read_text()))


@pytest.fixture(scope="module")
def reference_run(tiny_coco, tiny_weights, tmp_path_factory):
    """One evaluate run with our checkpoint: (spec, printed table, results.json, detections.json, folder)."""
    folder = tmp_path_factory.mktemp("reference")
    spec = tiny_spec(tiny_coco, folder / "results", tiny_weights[1])
    spec_file = folder / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["evaluate", "-e", str(spec_file)]) == 0
    return (spec, printed.getvalue(), *_outputs(folder / "results"), folder / "results" / "evaluate")


def test_evaluate_prints_and_writes_metrics(tiny_coco, reference_run):
    _, printed, results, detections, folder = reference_run
    for name in ("AP50", "AR100", "class_1", "class_2", "class_3"):
        assert name in printed
    assert set(STAT_NAMES) <= set(results) and set(results["per_class"]) == {"class_1", "class_2", "class_3"}
    assert results["num_images"] == 4 and results["num_detections"] == len(detections) == 4 * 20
    assert {d["image_id"] for d in detections} == {1, 2, 3, 4}
    # The written numbers are pycocotools' on the written detections.
    rescored = evaluate_coco(tiny_coco["val"]["json_file"], detections)
    assert {k: results[k] for k in STAT_NAMES} == {k: rescored[k] for k in STAT_NAMES}
    assert sorted(os.listdir(folder)) == ["detections.json", "experiment.yaml", "results.json"]  # nothing half-written


def test_batched_detections_match_single_images(tiny_weights, reference_run):
    """The task's batching, resizing and box conversion agree with a plain forward pass per image."""
    from deformable_detr.data import build_dataset
    from deformable_detr.model import build_model

    spec, _, _, detections, _ = reference_run
    model, _, postprocessor = build_model(spec_from_dict(spec))
    model.load_state_dict(tiny_weights[0])
    model.eval()
    dataset = build_dataset(spec_from_dict(spec), "test")
    for image, target in dataset:
        with torch.inference_mode():
            outputs = model(image[None], torch.zeros(1, *image.shape[-2:], dtype=torch.bool))
        found = postprocessor(outputs, target["orig_size"][None])[0]
        best = max((d for d in detections if d["image_id"] == int(target["image_id"])), key=lambda d: d["score"])
        x1, y1, x2, y2 = found["boxes"][0].tolist()
        assert best["score"] == pytest.approx(found["scores"][0].item(), abs=1e-5)
        assert best["category_id"] == int(found["labels"][0])
        assert best["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)


def test_conf_threshold_drops_low_scores(tiny_coco, tiny_weights, reference_run, write_spec, results_dir):
    everything = reference_run[3]
    threshold = sorted(d["score"] for d in everything)[len(everything) // 2]
    assert _evaluate(write_spec, tiny_spec(tiny_coco, results_dir, tiny_weights[1], conf_threshold=threshold)) == 0
    results, kept = _outputs(results_dir)
    assert len(kept) == sum(d["score"] >= threshold for d in everything) < len(everything)
    assert min(d["score"] for d in kept) >= threshold
    assert results["conf_threshold"] == pytest.approx(threshold)


def test_eval_class_ids_limit_the_scored_classes(tiny_coco, tiny_weights, write_spec, results_dir):
    spec = tiny_spec(tiny_coco, results_dir, tiny_weights[1])
    spec["dataset"]["eval_class_ids"] = [2]
    assert _evaluate(write_spec, spec) == 0
    results, detections = _outputs(results_dir)
    assert list(results["per_class"]) == ["class_2"]
    assert results["AP"] == evaluate_coco(tiny_coco["val"]["json_file"], detections, class_ids=[2])["AP"]


def _lightning(state: dict) -> dict:
    return {"state_dict": {f"model.model.{name}": value for name, value in state.items()}, "epoch": 3}


@pytest.mark.parametrize("layout", ["original", "lightning", "encrypted"])
def test_checkpoint_layouts_give_the_same_detections(layout, tiny_coco, tiny_weights, reference_run, write_spec,
                                                     results_dir, tmp_path):
    state, reference = tiny_weights[0], reference_run[3]
    path, extra = str(tmp_path / f"{layout}.pth"), []
    if layout == "original":  # Deformable-DETR's own files: {"model", "optimizer", "lr_scheduler", "epoch", "args"}
        save_object({"model": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 49, "args": None}, path)
    elif layout == "lightning":
        save_object(_lightning(state), path)
    else:
        save_object({"model": state}, path, key="s3cret")
        extra = ["-k", "s3cret"]
    assert _evaluate(write_spec, tiny_spec(tiny_coco, results_dir, path), *extra) == 0
    _, detections = _outputs(results_dir)
    assert detections == reference


def test_encrypted_checkpoint_without_key_is_a_usage_error(tiny_coco, tiny_weights, write_spec, results_dir,
                                                          tmp_path, capsys):
    path = str(tmp_path / "locked.pth")
    save_object({"model": tiny_weights[0]}, path, key="s3cret")
    assert _evaluate(write_spec, tiny_spec(tiny_coco, results_dir, path)) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("deformable-detr evaluate: error:") and "-k" in err
    assert not (results_dir / "evaluate" / "results.json").exists()


def test_checkpoint_of_another_model_names_the_file(tiny_coco, tiny_weights, write_spec, results_dir, capsys):
    spec = tiny_spec(tiny_coco, results_dir, tiny_weights[1])
    spec["model"]["num_queries"] = 12  # the checkpoint has 10 query embeddings
    assert _evaluate(write_spec, spec) == 2
    err = capsys.readouterr().err
    assert f"error: {tiny_weights[1]}: checkpoint does not fit the model" in err


def test_missing_checkpoint_field_is_named(tiny_coco, write_spec, results_dir, capsys):
    spec = tiny_spec(tiny_coco, results_dir, None)
    assert _evaluate(write_spec, spec) == 2
    assert "evaluate.checkpoint: not set" in capsys.readouterr().err


def test_missing_checkpoint_file_is_named(tiny_coco, write_spec, results_dir, tmp_path, capsys):
    missing = str(tmp_path / "nope.pth")
    assert _evaluate(write_spec, tiny_spec(tiny_coco, results_dir, missing)) == 2
    assert missing in capsys.readouterr().err


def test_trt_engine_is_refused_with_exit_3(tiny_coco, write_spec, results_dir, capsys):
    spec = tiny_spec(tiny_coco, results_dir, None, trt_engine="/models/ddetr.engine")
    assert _evaluate(write_spec, spec) == 3
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("deformable-detr evaluate: error: evaluate.trt_engine:")
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in err


def _detection_order(detection: dict) -> tuple:
    return detection["image_id"], -detection["score"], detection["category_id"]


def test_two_processes_gather_the_same_detections(tiny_coco, tiny_weights, reference_run, write_spec, results_dir,
                                                   monkeypatch):
    """num_gpus=2 on the CPU: two torchrun workers (gloo) each score half of the images; rank 0 gathers."""
    spec, _, single_results, single, _ = reference_run
    spec = dict(spec, results_dir=str(results_dir))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DDETR_DIST_TIMEOUT_S", "120")
    assert _evaluate(write_spec, dict(spec, evaluate={"checkpoint": tiny_weights[1], "num_gpus": 2})) == 0
    results, gathered = _outputs(results_dir)
    assert len(gathered) == len(single)
    for mine, theirs in zip(sorted(gathered, key=_detection_order), sorted(single, key=_detection_order)):
        assert (mine["image_id"], mine["category_id"]) == (theirs["image_id"], theirs["category_id"])
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
    assert results["AP"] == pytest.approx(single_results["AP"], abs=1e-6)


def test_taos_evaluate_fields_do_their_jobs(tiny_coco, tiny_weights, reference_run, write_spec, results_dir, logged,
                                            monkeypatch, capsys):
    """evaluate.batch_size (-1: dataset.batch_size) and gpu_ids; several nodes are refused in one line."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test: evaluate sets it
    spec = tiny_spec(tiny_coco, results_dir, tiny_weights[1], batch_size=3, gpu_ids=[2], num_nodes=1)
    assert _evaluate(write_spec, spec) == 0
    assert any("images, 3 at a time" in message for message in logged)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    metrics, detections = _outputs(results_dir)
    # The batch size changes how (float rounding of batched kernels), not what.
    assert [(d["image_id"], d["category_id"]) for d in detections] == [
        (d["image_id"], d["category_id"]) for d in reference_run[3]]
    assert [v for d in detections for v in d["bbox"] + [d["score"]]] == pytest.approx(
        [v for d in reference_run[3] for v in d["bbox"] + [d["score"]]], abs=1e-4)
    spec["evaluate"].update(num_nodes=2, gpu_ids=[0])
    assert _evaluate(write_spec, spec) == 2
    assert _error_line(capsys.readouterr().err) == (
        "deformable-detr evaluate: error: evaluate.num_nodes: 2; evaluate runs on one node; accepted: 1")
