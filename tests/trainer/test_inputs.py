"""Inputs that used to be accepted silently (issue 17): each is refused or reported in one line,
with the exit code, and nothing already written is lost."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from deformable_detr.cli import main
from deformable_detr.config.loader import spec_from_dict, spec_to_dict
from deformable_detr.errors import UsageError
from deformable_detr.runtime.checkpoint_io import load_object, save_object

TINY_MODEL = {"backbone": "resnet_18", "num_queries": 10, "num_feature_levels": 1, "return_interm_indices": [3],
              "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64,
              "enc_n_points": 4, "dec_n_points": 4, "num_select": 10}
AUG = {"scales": [64], "train_random_resize": [64], "train_random_crop_min": 48, "train_random_crop_max": 64,
       "random_resize_max_size": 64, "test_random_resize": 64}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """Our checkpoint format (weights + the spec they were trained with) for TINY_MODEL, 4 classes."""
    from deformable_detr.model import build_model

    torch.manual_seed(0)
    spec = spec_from_dict({"model": TINY_MODEL, "dataset": {"num_classes": 4}})
    model, _, _ = build_model(spec)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    save_object({"model": model.state_dict(), "epoch": 3, "spec": spec_to_dict(spec)}, path)
    return path


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def one_line_error(err: str, task: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"deformable-detr {task}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def coco_copy(tiny_coco, tmp_path, split="val", edit=None) -> dict:
    """A copy of a tiny_coco split's JSON (images stay where they are), changed by `edit(raw)`."""
    raw = json.loads(open(tiny_coco[split]["json_file"]).read())
    if edit:
        edit(raw)
    path = tmp_path / f"{split}-edited.json"
    path.write_text(json.dumps(raw))
    return {"image_dir": tiny_coco[split]["image_dir"], "json_file": str(path)}


def spec_file(write_spec, tmp_path, source, **sections) -> str:
    spec = {"results_dir": str(tmp_path / "results"), "model": TINY_MODEL,
            "dataset": {"num_classes": 4, "batch_size": 2, "workers": 0, "augmentation": AUG,
                        "train_data_sources": [source], "val_data_sources": [source], "test_data_sources": source},
            "train": {"num_epochs": 1}}
    spec.update(sections)
    return write_spec(spec)


def keep(path, text="from an earlier run\n") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    return text


# ------------------------------------------------------------- no ground truth

@pytest.mark.parametrize("edit, why", [(lambda raw: raw.pop("annotations"), "no 'annotations' key"),
                                       (lambda raw: raw.update(annotations=[]), "'annotations' is empty")])
def test_training_set_without_boxes_is_refused(tiny_coco, tmp_path, write_spec, capsys, edit, why):
    source = coco_copy(tiny_coco, tmp_path, "train", edit)
    earlier = keep(str(tmp_path / "results" / "train" / "notes.txt"))
    code, err = run_cli(capsys, "train", "-e", spec_file(write_spec, tmp_path, source), "train.auto_resume=false")
    assert code == 2
    line = one_line_error(err, "train")
    assert "dataset.train_data_sources: no boxes to train on" in line and source["json_file"] in line and why in line
    assert open(tmp_path / "results" / "train" / "notes.txt").read() == earlier


def test_evaluate_without_ground_truth_names_the_file(tiny_coco, tmp_path, write_spec, capsys, checkpoint):
    source = coco_copy(tiny_coco, tmp_path, "val", lambda raw: raw.pop("annotations"))
    earlier = keep(str(tmp_path / "results" / "evaluate" / "results.json"), '{"AP": 0.5}')
    code, err = run_cli(capsys, "evaluate", "-e", spec_file(write_spec, tmp_path, source),
                        f"evaluate.checkpoint={checkpoint}")
    assert code == 2
    line = one_line_error(err, "evaluate")
    assert f"dataset.test_data_sources: no boxes to score against; evaluation needs ground truth: " \
           f"{source['json_file']} (no 'annotations' key)" in line
    assert open(tmp_path / "results" / "evaluate" / "results.json").read() == earlier
    assert "AP -1" not in err


# ------------------------------------------------------------- boxes and sizes

def test_nan_and_infinite_boxes_are_counted_and_warned(tiny_coco, tmp_path, logged):
    from deformable_detr.data.coco_gt import merged_coco
    from deformable_detr.data.coco_json import load_source

    def poison(raw):
        raw["annotations"][0]["bbox"][0] = float("nan")
        raw["annotations"][1]["bbox"][3] = float("inf")

    source = coco_copy(tiny_coco, tmp_path, "train", poison)
    assert "NaN" in open(source["json_file"]).read()  # what Python's json writes and reads back
    columns = load_source(source["json_file"], source["image_dir"], 4)
    total = len(json.loads(open(tiny_coco["train"]["json_file"]).read())["annotations"])
    assert columns.nonfinite_boxes == 2 and columns.num_boxes == total - 2
    assert any("skipped 2 box(es) with a NaN or infinite coordinate" in m for m in logged)
    assert len(merged_coco([source["json_file"]]).getAnnIds()) == total - 2  # scoring leaves them out too


def _one_image_source(tmp_path, pixels_wh, listed_wh) -> dict:
    folder = tmp_path / "one"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", pixels_wh, (80, 80, 80)).save(folder / "images" / "a.png")
    raw = {"images": [{"id": 1, "file_name": "a.png", "width": listed_wh[0], "height": listed_wh[1]}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 0}],
           "categories": [{"id": 1, "name": "a"}]}
    (folder / "ann.json").write_text(json.dumps(raw))
    return {"image_dir": str(folder / "images"), "json_file": str(folder / "ann.json")}


@pytest.mark.parametrize("pixels, listed, hint", [((1, 1), (128, 128), ""),
                                                  ((40, 30), (30, 40), "size as stored, before EXIF orientation")])
def test_listed_size_must_match_the_pixels(tmp_path, pixels, listed, hint):
    from deformable_detr.data import build_dataset
    from deformable_detr.data.images import ImageSizeMismatch

    source = _one_image_source(tmp_path, pixels, listed)
    spec = spec_from_dict({"dataset": {"num_classes": 2, "train_data_sources": [source], "augmentation": AUG}})
    dataset = build_dataset(spec, "train")
    with pytest.raises(ImageSizeMismatch) as caught:
        dataset[0]
    message = str(caught.value)
    assert "\n" not in message and message.startswith(os.path.join(source["image_dir"], "a.png"))
    assert f"lists width {listed[0]}, height {listed[1]}, but the image is {pixels[0]}x{pixels[1]}" in message
    assert hint in message


def test_size_mismatch_in_a_training_run_is_one_line(tmp_path, write_spec, capsys):
    source = _one_image_source(tmp_path, (1, 1), (128, 128))
    spec = spec_file(write_spec, tmp_path, source, dataset={
        "num_classes": 2, "batch_size": 1, "workers": 0, "augmentation": AUG, "train_data_sources": [source]})
    code, err = run_cli(capsys, "train", "-e", spec, "train.auto_resume=false")
    assert code == 2
    assert "a.png: the annotation file lists width 128, height 128, but the image is 1x1" in \
        one_line_error(err, "train")


def test_exif_orientation_is_applied_everywhere(tmp_path):
    """Images are read as shown, as TAO reads them: a JPEG tagged 'rotate 90' is 30 wide, 40 high."""
    from deformable_detr.data.images import load_image
    from deformable_detr.data.kitti import image_size

    path = str(tmp_path / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    stored = Image.new("RGB", (40, 30), (10, 200, 10))
    stored.paste((250, 10, 10), (0, 0, 12, 12))  # red in the stored top-left corner: shown top-right
    stored.save(path, exif=exif.tobytes(), quality=95)
    assert tuple(load_image(path).shape[-2:]) == (40, 30)
    assert image_size(path) == (40, 30)  # convert records the size as shown, as the loaders read it
    shown = load_image(path)
    assert shown[0, 4, 25] > 200 and shown[1, 4, 25] < 60      # top-right: the red corner
    assert shown[0, 35, 4] < 60 and shown[1, 35, 4] > 150       # bottom-left: green


# ------------------------------------------------------------- checkpoints

def test_checkpoint_of_another_architecture_with_the_same_shapes_is_refused(
        tiny_coco, tmp_path, write_spec, capsys, checkpoint):
    # nheads 2 x 4 points and nheads 4 x 2 points: every tensor has the same shape.
    onnx = tmp_path / "results" / "export" / "model.onnx"
    earlier = keep(str(onnx))
    spec = spec_file(write_spec, tmp_path, tiny_coco["val"],
                     model={**TINY_MODEL, "nheads": 4, "enc_n_points": 2, "dec_n_points": 2})
    code, err = run_cli(capsys, "export", "-e", spec, f"export.checkpoint={checkpoint}",
                        f"export.onnx_file={onnx}")
    assert code == 2
    line = one_line_error(err, "export")
    assert f"{checkpoint}: checkpoint was trained with another architecture" in line
    assert "model.nheads: checkpoint 2, spec 4" in line and "model.enc_n_points: checkpoint 4, spec 2" in line
    assert onnx.read_text() == earlier


def test_resume_with_fewer_epochs_than_the_checkpoint_says_so():
    from deformable_detr.tasks.train.state import check_resume

    spec = spec_from_dict({"model": TINY_MODEL, "train": {"num_epochs": 2}})
    state = {"epoch": 4, "epoch_finished": True, "spec": spec_to_dict(spec)}  # 0-based: the 5th epoch
    with pytest.raises(UsageError, match=r"train.num_epochs: 2 is below the epoch of the checkpoint to resume "
                                         r"\(ck.pth: epoch 5\); set train.num_epochs to 5 or more"):
        check_resume(spec, state, "ck.pth")
    check_resume(spec_from_dict({"model": TINY_MODEL, "train": {"num_epochs": 5}}), state, "ck.pth")
    other = spec_from_dict({"model": {**TINY_MODEL, "dec_n_points": 8}, "train": {"num_epochs": 9}})
    with pytest.raises(UsageError, match=r"model.dec_n_points: checkpoint 4, spec 8"):
        check_resume(other, state, "ck.pth")


def test_checkpoint_path_that_is_a_folder(tmp_path):
    (tmp_path / "ckpts").mkdir()
    with pytest.raises(UsageError, match=r"^checkpoint .*ckpts is a folder, expected a file \(.pth\)$"):
        load_object(str(tmp_path / "ckpts"))


def test_truncated_checkpoint_is_one_readable_line(tmp_path, checkpoint):
    data = open(checkpoint, "rb").read()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError) as caught:
        load_object(str(path))
    message = str(caught.value)
    assert message == (f"checkpoint {path} is truncated or not a PyTorch checkpoint (PytorchStreamReader failed "
                       "reading zip archive: failed finding central directory)")


def test_key_for_an_unencrypted_checkpoint_is_reported(checkpoint, logged):
    load_object(checkpoint, key="secret")
    assert f"-k: checkpoint {checkpoint} is not encrypted; the key is not needed to read it" in logged


# ------------------------------------------------------------- spec and paths

def test_duplicate_yaml_key_names_the_line(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  nheads: 4\n  hidden_dim: 64\n  nheads: 8\n")
    code, err = run_cli(capsys, "train", "-e", str(spec), "-r", str(tmp_path / "r"))
    assert code == 2
    assert one_line_error(err, "train") == (f"deformable-detr train: error: {spec}:4: duplicate key 'nheads' "
                                            "(first given on line 2); each key may appear once in a section")
    assert not (tmp_path / "r").exists()


def test_json_file_that_is_a_folder_and_missing_image_dir(tiny_coco, tmp_path, write_spec, capsys, checkpoint):
    folder_source = {"image_dir": tiny_coco["val"]["image_dir"], "json_file": str(tmp_path)}
    code, err = run_cli(capsys, "evaluate", "-e", spec_file(write_spec, tmp_path, folder_source),
                        f"evaluate.checkpoint={checkpoint}")
    assert code == 2
    assert one_line_error(err, "evaluate").endswith(
        f"dataset.test_data_sources[0].json_file: {tmp_path} is a folder, expected a file (COCO JSON)")
    no_images = {"image_dir": "no/such/images", "json_file": tiny_coco["val"]["json_file"]}
    code, err = run_cli(capsys, "evaluate", "-e", spec_file(write_spec, tmp_path, no_images),
                        f"evaluate.checkpoint={checkpoint}")
    assert code == 2
    assert one_line_error(err, "evaluate").endswith(
        f"dataset.test_data_sources[0].image_dir: folder not found: no/such/images (relative to {os.getcwd()})")
    assert not (tmp_path / "results" / "evaluate").exists()  # nothing left of the refused runs


def test_default_spec_for_an_unknown_task_names_the_tasks(capsys):
    code, err = run_cli(capsys, "default-spec", "nosuchtask")
    assert code == 2
    assert err == ("deformable-detr default-spec: error: 'nosuchtask' is not a task; accepted: train, evaluate, "
                   "inference, export, gen_trt_engine, convert")


def test_relative_spec_path_says_relative_to_what(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "train", "-e", "specs/none.yaml")
    assert code == 2
    assert err == f"deformable-detr train: error: spec file not found: specs/none.yaml (relative to {tmp_path})"


def test_gen_trt_engine_without_tensorrt_writes_nothing(tmp_path, write_spec, capsys):
    from deformable_detr.export.trt import missing_requirements

    if not missing_requirements():
        pytest.skip("tensorrt and a GPU are present: the engine would be built")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    spec = write_spec({"results_dir": str(tmp_path / "results"), "gen_trt_engine": {"onnx_file": str(onnx)}})
    code, err = run_cli(capsys, "gen_trt_engine", "-e", spec)
    assert code == 3
    line = one_line_error(err, "gen_trt_engine")
    assert "a TensorRT engine cannot be built here" in line
    if "not installed" in line:
        assert "pip install './trainer[tensorrt]'" in line
    assert not (tmp_path / "results").exists()


def test_refused_run_keeps_the_earlier_effective_spec(tmp_path, write_spec, capsys):
    earlier = keep(str(tmp_path / "results" / "export" / "experiment.yaml"), "# the run before\n")
    spec = write_spec({"results_dir": str(tmp_path / "results"), "export": {"checkpoint": str(tmp_path / "no.pth")}})
    code, err = run_cli(capsys, "export", "-e", spec)
    assert code == 2 and "checkpoint not found" in err
    assert open(tmp_path / "results" / "export" / "experiment.yaml").read() == earlier


# ------------------------------------------------------------- inference -> convert

def test_class_names_with_spaces_round_trip_inference_to_convert(tiny_coco, tmp_path, write_spec, capsys,
                                                                  checkpoint):
    images = tmp_path / "source" / "images"
    shutil.copytree(tiny_coco["val"]["image_dir"], images)
    classmap = tmp_path / "classmap.txt"
    classmap.write_text("potted plant\nstop sign\ntraffic  light\n")
    spec = spec_file(write_spec, tmp_path, tiny_coco["val"],
                     inference={"checkpoint": checkpoint, "conf_threshold": 0.0})
    code, err = run_cli(capsys, "inference", "-e", spec, f"dataset.infer_data_sources.image_dir=[{images}]",
                        f"dataset.infer_data_sources.classmap={classmap}")
    assert code == 0, err
    labels = tmp_path / "results" / "inference" / "labels"
    lines = [line for name in sorted(os.listdir(labels)) for line in (labels / name).read_text().splitlines()]
    assert lines and all(len(line.split()) == 16 for line in lines)
    assert {line.split()[0] for line in lines} <= {"potted_plant", "stop_sign", "traffic_light"}
    os.symlink(labels, tmp_path / "source" / "labels")
    (tmp_path / "sources.txt").write_text(str(tmp_path / "source") + "\n")
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"plant": ["potted plant"], "sign": ["stop sign"], "light": ["traffic light"]}))
    code, err = run_cli(capsys, "convert", "-e", spec, f"convert.input_source={tmp_path / 'sources.txt'}",
                        f"convert.mapping_path={mapping}", "convert.num_shards=1")
    assert code == 0, err
    shard = json.loads(next((tmp_path / "results" / "convert" / "source").glob("*.json")).read_text())
    assert len(shard["annotations"]) == len(lines)


@pytest.mark.parametrize("field, call", [
    ("dataset.infer_data_sources.classmap", lambda path: __import__("deformable_detr.data.inference",
                                                                     fromlist=["_"]).read_classmap(path)),
    ("convert.mapping_path", lambda path: __import__("deformable_detr.data.kitti", fromlist=["_"]).read_mapping(path)),
    ("convert.input_source", lambda path: __import__("deformable_detr.tasks.convert",
                                                      fromlist=["_"]).read_input_source(path)),
])
def test_other_files_given_as_folders_or_missing(tmp_path, monkeypatch, field, call):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=rf"^{field}: {tmp_path} is a folder, expected a file"):
        call(str(tmp_path))
    with pytest.raises(UsageError) as caught:
        call("missing.txt")
    assert str(caught.value) == f"{field}: file not found: missing.txt (relative to {tmp_path})"


def test_inference_image_dir_missing_or_a_file(tmp_path, monkeypatch):
    from deformable_detr.data.inference import list_images

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(UsageError, match=r"^dataset.infer_data_sources.image_dir: a.jpg is a file, expected a folder"):
        list_images(["a.jpg"])
    with pytest.raises(UsageError) as caught:
        list_images(["frames"])
    assert str(caught.value) == f"dataset.infer_data_sources.image_dir: folder not found: frames (relative to {tmp_path})"
