"""The example-data generator: deterministic, consistent COCO and KITTI copies, loadable and convertible."""
from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import yaml
from PIL import Image

from deformable_detr.cli import main
from deformable_detr.config.loader import spec_from_dict
from deformable_detr.data import build_dataset, read_classmap
from deformable_detr.data.example import CLASS_NAMES, make_example_data


def generate(folder, seed=0, num_train=12, num_val=4, size=64):
    return make_example_data(str(folder), num_train=num_train, num_val=num_val, image_size=size, seed=seed,
                             quiet=True)


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    generate(tmp_path / "c", seed=1)
    files = all_files(tmp_path / "a")
    assert files == all_files(tmp_path / "b")
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert not mismatch and not errors
    assert (tmp_path / "a/train/annotations.json").read_text() != (tmp_path / "c/train/annotations.json").read_text()


def test_coco_copy_is_a_valid_dataset_with_visible_objects(tmp_path):
    summary = generate(tmp_path, num_train=30)
    coco = json.loads(open(summary["train"]["json_file"]).read())
    assert len(coco["images"]) == 30 and summary["train"]["boxes"] == len(coco["annotations"])
    # ids as convert assigns them: reverse alphabetical
    assert [c["name"] for c in coco["categories"]] == sorted(CLASS_NAMES, reverse=True)
    assert read_classmap(summary["classmap"]) == sorted(CLASS_NAMES, reverse=True)
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 4, 5}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
        assert w >= 0.14 * 64 - 2 and abs(w - h) <= 1  # not too tiny; shapes fill square boxes
    # The object's colour shows at its box centre (objects are not hidden by later ones).
    image = np.asarray(Image.open(os.path.join(summary["train"]["image_dir"], coco["images"][0]["file_name"])))
    first = [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]][-1]
    x, y, w, h = first["bbox"]
    centre = image[int(y + h / 2), int(x + w / 2)].astype(int)
    assert centre.max() - centre.min() > 60  # saturated object colour, not the muted background
    source = {"image_dir": summary["train"]["image_dir"], "json_file": summary["train"]["json_file"]}
    spec = spec_from_dict({"dataset": {"train_data_sources": [source],
                                       "num_classes": summary["num_classes"], "workers": 0}})
    dataset = build_dataset(spec, "train", verify_images=True)
    assert len(dataset) == 30


def test_kitti_copy_matches_coco_and_converts_to_the_same_boxes(tmp_path, capsys):
    summary = generate(tmp_path / "data")
    spec_path = tmp_path / "convert.yaml"
    spec_path.write_text(yaml.safe_dump({"convert": {"input_source": summary["kitti_sources"],
                                                     "mapping_path": summary["kitti_mapping"], "num_shards": 2}}))
    assert main(["convert", "-e", str(spec_path), "-r", str(tmp_path / "results")]) == 0
    for split in ("train", "val"):
        coco = json.loads(open(summary[split]["json_file"]).read())
        shards = [json.loads(open(tmp_path / "results" / "convert" / split / f"{split}-shard-0000{s}-of-00002.json")
                             .read()) for s in range(2)]
        assert shards[0]["categories"] == coco["categories"]
        assert all(img["file_name"].startswith(f"{split}/images/") for shard in shards for img in shard["images"])
        converted = sorted((img["file_name"].split("/", 2)[2], a["category_id"], a["bbox"])
                           for shard in shards for img in shard["images"] for a in shard["annotations"]
                           if a["image_id"] == img["id"])
        names = {img["id"]: img["file_name"] for img in coco["images"]}
        original = sorted((names[a["image_id"]], a["category_id"], a["bbox"]) for a in coco["annotations"])
        assert converted == original


def test_cli_prints_where_things_are(tmp_path, capsys):
    assert main(["make-example-data", "--out", str(tmp_path / "ex"), "--num-train", "3", "--num-val", "2",
                 "--image-size", "48", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert f"json_file {tmp_path / 'ex' / 'train' / 'annotations.json'}" in out
    assert f"input_source {tmp_path / 'ex' / 'kitti' / 'sources.txt'}" in out
    assert (tmp_path / "ex" / "kitti" / "train" / "labels" / "train_000002.txt").exists()
    assert main(["make-example-data", "--out", str(tmp_path / "ex2"), "--image-size", "8"]) == 2
