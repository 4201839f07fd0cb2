"""`deformable-detr inference` end to end: KITTI labels and drawn images from a tiny real model."""
from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from deformable_detr.cli import main
from deformable_detr.config.loader import spec_from_dict
from deformable_detr.runtime.checkpoint_io import save_object

TINY_MODEL = {"backbone": "resnet_18", "num_queries": 10, "num_feature_levels": 1, "return_interm_indices": [3],
              "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64,
              "enc_n_points": 2, "dec_n_points": 2, "num_select": 20}
CLASSES = ["car", "person", "bicycle"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from deformable_detr.model import build_model

    torch.manual_seed(0)
    model, _, _ = build_model(spec_from_dict({"model": TINY_MODEL, "dataset": {"num_classes": 4}}))
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    save_object({"model": model.state_dict()}, path)
    return path


@pytest.fixture
def image_folder(tiny_coco, tmp_path) -> str:
    folder = tmp_path / "frames"
    shutil.copytree(tiny_coco["val"]["image_dir"], folder)
    return str(folder)


@pytest.fixture
def classmap(tmp_path) -> str:
    path = tmp_path / "classmap.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return str(path)


def tiny_spec(results_dir, checkpoint: str, image_dirs, classmap: str, **inference) -> dict:
    return {
        "results_dir": str(results_dir),
        "model": dict(TINY_MODEL),
        "dataset": {"num_classes": 4, "batch_size": 2, "workers": 0, "pin_memory": False,
                    "infer_data_sources": {"image_dir": list(image_dirs), "classmap": classmap},
                    "augmentation": {"test_random_resize": 64, "random_resize_max_size": 64, "fixed_padding": False}},
        "inference": {"checkpoint": checkpoint, "conf_threshold": 0.0, **inference},
    }


def _infer(write_spec, spec: dict, *extra: str) -> int:
    return main(["inference", "-e", write_spec(spec), *extra])


def _error_line(stderr: str) -> str:
    """The CLI's one error line (log lines of the run may precede it on stderr)."""
    lines = [line for line in stderr.splitlines() if line.startswith("deformable-detr inference:")]
    assert len(lines) == 1, stderr
    assert stderr.strip().splitlines()[-1] == lines[0], "the error message runs over several lines"
    return lines[0]


def _stems(folder) -> list[str]:
    return sorted(os.path.splitext(name)[0] for name in os.listdir(folder))


def test_labels_and_annotated_images_for_every_image(checkpoint, image_folder, classmap, write_spec, results_dir):
    colour = (255, 0, 255)
    spec = tiny_spec(results_dir, checkpoint, [image_folder], classmap, color_map={"car": "#ff00ff"})
    assert _infer(write_spec, spec) == 0
    out = results_dir / "inference"
    inputs = _stems(image_folder)
    assert _stems(out / "labels") == inputs and _stems(out / "images_annotated") == inputs
    seen_cars = False
    for stem in inputs:
        lines = (out / "labels" / f"{stem}.txt").read_text().splitlines()
        # Threshold 0: every one of the 20 top (query, class) pairs except the background id 0.
        assert 0 < len(lines) <= 20
        for line in lines:
            fields = line.split()
            assert len(fields) == 16 and fields[0] in CLASSES
            assert all(len(v.split(".")[1]) == 3 for v in fields[4:8])  # TAO's 3 decimals, not clipped
            x1, y1, x2, y2 = (float(v) for v in fields[4:8])
            assert x1 <= x2 and y1 <= y2
            assert 0.0 <= float(fields[15]) <= 1.0
        drawn = Image.open(out / "images_annotated" / f"{stem}.jpg").convert("RGB")
        original = Image.open(os.path.join(image_folder, f"{stem}.jpg")).convert("RGB")
        assert drawn.size == original.size
        if any(line.startswith("car ") for line in lines):
            seen_cars = True
            # JPEG blurs colours a little: look for pixels close to the configured magenta.
            near = [p for p in drawn.getdata() if sum(abs(a - b) for a, b in zip(p, colour)) < 90]
            assert near, f"no {colour} box drawn for the cars of {stem}"
    assert seen_cars


def test_threshold_keeps_only_confident_detections(checkpoint, image_folder, classmap, write_spec, results_dir):
    assert _infer(write_spec, tiny_spec(results_dir, checkpoint, [image_folder], classmap)) == 0
    labels = results_dir / "inference" / "labels"
    scores = sorted(float(line.split()[-1]) for path in labels.iterdir() for line in path.read_text().splitlines())
    threshold = scores[len(scores) // 2]
    assert _infer(write_spec, tiny_spec(results_dir, checkpoint, [image_folder], classmap,
                                        conf_threshold=threshold)) == 0
    kept = [float(line.split()[-1]) for path in labels.iterdir() for line in path.read_text().splitlines()]
    # Scores are written rounded to 3 decimals.
    assert kept and min(kept) >= round(threshold, 3) - 1e-9 and len(kept) < len(scores)
    assert _infer(write_spec, tiny_spec(results_dir, checkpoint, [image_folder], classmap, conf_threshold=1.0)) == 0
    assert all(path.read_text() == "" for path in labels.iterdir())  # nothing detected: empty label files


def test_unreadable_image_is_reported_and_skipped(checkpoint, image_folder, classmap, write_spec, results_dir,
                                                 logged):
    broken = os.path.join(image_folder, "broken.jpg")
    with open(broken, "wb") as fh:
        fh.write(b"this is not a jpeg")
    assert _infer(write_spec, tiny_spec(results_dir, checkpoint, [image_folder], classmap)) == 0
    assert "broken" not in _stems(results_dir / "inference" / "labels")
    assert len(_stems(results_dir / "inference" / "labels")) == 4
    assert any(broken in message for message in logged)


def test_image_that_fails_to_decode_later_is_reported_and_skipped(checkpoint, image_folder, classmap,
                                                                  logged):
    """A file that passed the up-front check but cannot be read when its batch is loaded."""
    from deformable_detr.data import InferenceImages
    from deformable_detr.tasks.inference import _collate, _readable_batches, _ReportUndecodable

    spec = spec_from_dict(tiny_spec("/unused", checkpoint, [image_folder], classmap))
    images = InferenceImages(spec)
    gone = images.paths[1]
    os.remove(gone)
    loader = DataLoader(_ReportUndecodable(images), batch_size=2, collate_fn=functools.partial(_collate, pad_to=None))
    failed: list[dict] = []
    batches = list(_readable_batches(loader, failed))
    assert [len(targets) for _, _, targets in batches] == [1, 2]
    assert [item["path"] for item in failed] == [gone]
    assert any(gone in message for message in logged)


def test_class_id_outside_the_classmap_is_a_clear_error(checkpoint, image_folder, tmp_path, write_spec,
                                                        results_dir, capsys):
    short = tmp_path / "short.txt"
    short.write_text("car\n")  # the model has ids 1..3
    assert _infer(write_spec, tiny_spec(results_dir, checkpoint, [image_folder], str(short))) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("deformable-detr inference: error: dataset.infer_data_sources.classmap:")
    assert str(short) in err and "names only ids 1..1" in err


def test_is_internal_keeps_folders_apart(checkpoint, tiny_coco, tmp_path, classmap, write_spec, results_dir):
    for name in ("cam_a", "cam_b"):
        shutil.copytree(tiny_coco["val"]["image_dir"], tmp_path / name)
    folders = [str(tmp_path / "cam_a"), str(tmp_path / "cam_b")]
    spec = tiny_spec(results_dir, checkpoint, folders, classmap, conf_threshold=0.9)
    assert _infer(write_spec, spec) == 2  # the same file names in two folders would overwrite each other
    assert _infer(write_spec, tiny_spec(results_dir, checkpoint, folders, classmap, conf_threshold=0.9,
                                        is_internal=True)) == 0
    out = results_dir / "inference"
    for name in ("cam_a", "cam_b"):
        assert len(os.listdir(out / "labels" / name)) == 4
        assert len(os.listdir(out / "images_annotated" / name)) == 4


def test_bad_colour_is_named(checkpoint, image_folder, classmap, write_spec, results_dir, capsys):
    spec = tiny_spec(results_dir, checkpoint, [image_folder], classmap, color_map={"car": "bluish"})
    assert _infer(write_spec, spec) == 2
    assert "inference.color_map.car: 'bluish'" in capsys.readouterr().err


def test_missing_classmap_is_named(checkpoint, image_folder, write_spec, results_dir, capsys):
    spec = tiny_spec(results_dir, checkpoint, [image_folder], None)
    assert _infer(write_spec, spec) == 2
    assert "dataset.infer_data_sources.classmap: not set" in capsys.readouterr().err


def test_trt_engine_is_refused_with_exit_3(image_folder, classmap, write_spec, results_dir, capsys):
    spec = tiny_spec(results_dir, None, [image_folder], classmap, trt_engine="/models/ddetr.engine")
    assert _infer(write_spec, spec) == 3
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("deformable-detr inference: error: inference.trt_engine:")


@pytest.mark.slow
def test_two_processes_share_the_images(checkpoint, image_folder, classmap, write_spec, results_dir, tmp_path,
                                        monkeypatch):
    """inference.num_gpus=2 on the CPU: two torchrun workers write the same files one process writes."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single_dir, double_dir = tmp_path / "one", tmp_path / "two"
    assert _infer(write_spec, tiny_spec(single_dir, checkpoint, [image_folder], classmap)) == 0
    assert _infer(write_spec, tiny_spec(double_dir, checkpoint, [image_folder], classmap, num_gpus=2)) == 0
    single = {p.name: p.read_text() for p in (single_dir / "inference" / "labels").iterdir()}
    double = {p.name: p.read_text() for p in (double_dir / "inference" / "labels").iterdir()}
    assert single.keys() == double.keys() and len(single) == 4
    for name, text in single.items():
        assert [line.split()[0] for line in text.splitlines()] == [line.split()[0] for line in double[name].splitlines()]


def test_taos_inference_fields_do_their_jobs(checkpoint, image_folder, classmap, write_spec, results_dir, logged,
                                             monkeypatch):
    """inference.batch_size (-1: dataset.batch_size), outline_width and gpu_ids, from a TAO 6 spec."""
    import deformable_detr.tasks.inference as inference_task

    widths = []
    draw = inference_task.draw_detections
    monkeypatch.setattr(inference_task, "draw_detections",
                        lambda image, detections, colors, width: widths.append(width) or draw(image, detections,
                                                                                               colors, width))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test: inference sets it
    spec = tiny_spec(results_dir, checkpoint, [image_folder], classmap, batch_size=3, outline_width=7,
                     gpu_ids=[1], num_nodes=1)
    assert _infer(write_spec, spec) == 0
    assert any("images, 3 at a time" in message for message in logged)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert widths == [7] * len(_stems(image_folder))
    spec["inference"].update(batch_size=-1, outline_width=1, gpu_ids=[0])
    assert _infer(write_spec, spec) == 0
    assert any("images, 2 at a time" in message for message in logged)  # dataset.batch_size
    assert widths[-1] == 1
