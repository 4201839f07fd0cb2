"""The convert task: KITTI folders -> sharded COCO JSON, through the real CLI."""
from __future__ import annotations

import glob
import json
import os

import pytest
import yaml
from PIL import Image

from deformable_detr.cli import main
from deformable_detr.config.loader import spec_from_dict
from deformable_detr.data import build_dataset
from deformable_detr.data.kitti import category_ids_for, read_mapping
from deformable_detr.data.shards import shard_file_name, split_indices

LABELS = {
    # name: (image (w, h), label lines)
    "000001": ((40, 30), ["Person 0.00 0 0.00 1.00 2.00 11.00 22.00 0 0 0 0 0 0 0",
                          "car 0.00 0 0.00 0 0 5 5 0 0 0 0 0 0 0"]),
    "000002": ((50, 20), ["rider 0.1 1 -1.0 5.5 1.5 20.5 19.0 1 2 3 4 5 6 7 0.9",
                          "Backpack 0 0 0 30 2 40 12 0 0 0 0 0 0 0"]),
    "000003": ((32, 32), ["Face 0 0 0 3 3 9 9 0 0 0 0 0 0 0", "person_group 0 0 0 10 10 30 30 0 0 0 0 0 0 0"]),
    "000004": ((32, 32), []),
    "000005": ((24, 16), ["large_bag 0 0 0 1 1 4 4 0 0 0 0 0 0 0", "person 0 0 0 5 5 5 9 0 0 0 0 0 0 0"]),
}


def make_kitti_source(root, name="a", labels=LABELS):
    for sub in ("images", "labels"):
        os.makedirs(root / name / sub, exist_ok=True)
    for stem, (size, lines) in labels.items():
        Image.new("RGB", size, (10, 20, 30)).save(root / name / "images" / f"{stem}.jpg")
        (root / name / "labels" / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
    return root / name


def run_convert(tmp_path, capsys=None, sources=("a",), **convert):
    listing = tmp_path / "sources.txt"
    listing.write_text("".join(f"{s}\n" for s in sources))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"convert": {"input_source": str(listing), **convert}}))
    code = main(["convert", "-e", str(spec_path), "-r", str(tmp_path / "results")])
    return code, tmp_path / "results" / "convert"


def load(path):
    return json.loads(path.read_text())


def test_converts_with_default_mapping_into_tao_named_shards(tmp_path, capsys):
    make_kitti_source(tmp_path)
    code, out = run_convert(tmp_path, num_shards=2)
    assert code == 0
    names = sorted(os.listdir(out / "a"))
    assert names == ["a-shard-00000-of-00002.json", "a-shard-00001-of-00002.json"]
    first, second = load(out / "a" / names[0]), load(out / "a" / names[1])
    # TAO's ids: reverse alphabetical over the target names.
    assert first["categories"] == second["categories"] == [
        {"id": 1, "name": "person"}, {"id": 2, "name": "face"}, {"id": 3, "name": "bag"}]
    assert [i["file_name"] for i in first["images"]] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert [i["file_name"] for i in second["images"]] == ["000004.jpg", "000005.jpg"]
    assert (first["images"][1]["height"], first["images"][1]["width"]) == (20, 50)
    by_image = {}
    for ann in first["annotations"] + second["annotations"]:
        by_image.setdefault(ann["image_id"], []).append((ann["category_id"], ann["bbox"]))
    assert by_image[1] == [(1, [1.0, 2.0, 10.0, 20.0])]                     # car is unmapped
    assert by_image[2] == [(1, [5.5, 1.5, 15.0, 17.5]), (3, [30.0, 2.0, 10.0, 10.0])]  # 16 columns ok
    assert by_image[3] == [(2, [3.0, 3.0, 6.0, 6.0]), (1, [10.0, 10.0, 20.0, 20.0])]
    assert by_image[5] == [(3, [1.0, 1.0, 3.0, 3.0])]                       # zero-width box skipped
    stats = (out / "stats.txt").read_text()
    assert stats == capsys.readouterr().out.split("wrote ")[0]
    assert "a/a-shard-00000-of-00002.json  3       5" in stats
    assert "skipped boxes of unmapped classes (car: 1)" in stats
    assert "skipped 1 box(es) with non-positive width or height" in stats
    assert "num_classes: 4" in stats
    assert not [f for f in glob.glob(str(out / "**" / ".*"), recursive=True)]  # no temporary files left


def test_converted_shards_load_as_a_training_source(tmp_path):
    source = make_kitti_source(tmp_path)
    code, out = run_convert(tmp_path, num_shards=3)
    assert code == 0
    spec = spec_from_dict({"dataset": {
        "train_data_sources": [{"image_dir": str(source / "images"), "json_file": str(out / "a" / "*.json")}],
        "num_classes": 4, "workers": 0, "augmentation": {"test_random_resize": 32, "fixed_padding": False}}})
    dataset = build_dataset(spec, "train")
    assert len(dataset) == 5 and len(dataset.json_files) == 3
    assert sorted(dataset.coco.getImgIds()) == [1, 2, 3, 4, 5]  # renumbered in shard order


def test_partitions_are_random_disjoint_and_reproducible(tmp_path):
    labels = {f"{k:06d}": ((8, 8), ["person 0 0 0 1 1 5 5 0 0 0 0 0 0 0"]) for k in range(11)}
    make_kitti_source(tmp_path, labels=labels)
    code, out = run_convert(tmp_path, num_partitions=2, num_shards=2)
    assert code == 0
    names = sorted(os.listdir(out / "a"))
    assert names == [shard_file_name("a", p, 2, s, 2) for p in range(2) for s in range(2)]
    assert names[0] == "a-fold-0-of-2-shard-00000-of-00002.json"
    sizes = [len(load(out / "a" / n)["images"]) for n in names]
    assert sorted(sizes) == [2, 3, 3, 3] and sum(sizes) == 11
    ids = [i["id"] for n in names for i in load(out / "a" / n)["images"]]
    assert sorted(ids) == list(range(1, 12))
    fold0 = {i["id"] for n in names[:2] for i in load(out / "a" / n)["images"]}
    assert fold0 != set(range(1, 7))  # a random split, not the first half
    first_run = [load(out / "a" / n) for n in names]
    run_convert(tmp_path, num_partitions=2, num_shards=2)
    assert [load(out / "a" / n) for n in names] == first_run


def test_split_indices_balances_shards():
    parts = split_indices(10, 1, 4)
    assert [len(s) for s in parts[0]] == [3, 3, 2, 2]
    assert [int(i) for s in parts[0] for i in s] == list(range(10))


def test_relative_and_absolute_source_lines(tmp_path):
    make_kitti_source(tmp_path / "data", name="a")
    make_kitti_source(tmp_path / "elsewhere", name="b", labels={"000001": ((8, 8), [])})
    code, out = run_convert(tmp_path, sources=("data/a", str(tmp_path / "elsewhere" / "b")), num_shards=1)
    assert code == 0
    assert os.listdir(out / "a") == ["a-shard-00000-of-00001.json"]
    assert os.listdir(out / "b") == ["b-shard-00000-of-00001.json"]


@pytest.mark.parametrize("mapping", [
    {"walker": ["person", "Rider"], "thing": ["car"]},          # {target: [sources]}
    {"Person": "walker", "rider": "walker", "CAR": "thing"},    # TAO's flat {source: target}
])
def test_mapping_file_in_either_form(tmp_path, mapping):
    make_kitti_source(tmp_path)
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    code, out = run_convert(tmp_path, num_shards=1, mapping_path=str(tmp_path / "map.json"))
    assert code == 0
    shard = load(out / "a" / "a-shard-00000-of-00001.json")
    assert shard["categories"] == [{"id": 1, "name": "walker"}, {"id": 2, "name": "thing"}]
    assert [a["category_id"] for a in shard["annotations"]] == [1, 2, 1]  # backpack, face... unmapped


def test_category_ids_are_reverse_alphabetical():
    assert category_ids_for(read_mapping(None).values()) == {"person": 1, "face": 2, "bag": 3}


@pytest.mark.parametrize("break_it, message", [
    (lambda root: (root / "a" / "labels" / "000002.txt").write_text("person 0 0 0 1 1 5\n"),
     r"000002.txt:1: a KITTI label line has 15 columns \(16 with a score\), got 7"),
    (lambda root: os.remove(root / "a" / "labels" / "000003.txt"),
     r"000003.jpg: no label file .*000003.txt"),
    (lambda root: (root / "a" / "labels" / "000001.txt").write_text(
        "\nperson 0 0 0 1 1 x 5 0 0 0 0 0 0 0\n"), r"000001.txt:2: columns 5-8 must be the box"),
    (lambda root: (root / "sources.txt").write_text("a\nmissing\n"), r"sources.txt:2: data-source folder not found"),
])
def test_bad_input_is_one_line_with_file_and_line(tmp_path, capsys, break_it, message):
    import re

    make_kitti_source(tmp_path)
    listing = tmp_path / "sources.txt"
    listing.write_text("a\n")
    break_it(tmp_path)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"convert": {"input_source": str(listing)}}))
    code = main(["convert", "-e", str(spec_path), "-r", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("deformable-detr convert: error: ") and re.search(message, err[-1])
    assert not (tmp_path / "results" / "convert" / "a").exists()


def test_input_source_must_be_set(tmp_path, capsys):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"convert": {}}))
    assert main(["convert", "-e", str(spec_path), "-r", str(tmp_path / "r")]) == 2
    assert "convert.input_source: not set" in capsys.readouterr().err
