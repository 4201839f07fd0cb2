"""The convert task: KITTI folders -> sharded COCO JSON, through the real CLI."""
from __future__ import annotations

import glob
import json
import math
import os
import random

import pytest
import yaml
from PIL import Image

from deformable_detr.cli import main
from deformable_detr.config.loader import spec_from_dict
from deformable_detr.data import build_dataset
from deformable_detr.data.kitti import category_ids_for, read_mapping

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


# ---------------------------------------------------------------- TAO's converter, by hand
#
# What TAO's converter does with one source, step by step (the reference these tests compare
# with, written from its behaviour): frames in the order os.listdir gives them; Python's random
# seeded 42 for each source; random mode: fold 0 the first int(val_split% of n) frames, fold 1 the
# rest, each shuffled; then every partition shuffled; shards of ceil(n / num_shards) frames, a
# short one filled with random.sample of its partition; ids counted on over shards and sources.


def tao_frames(image_dir) -> list[str]:
    return [os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.endswith(".jpg")]


def tao_shards(frames, num_shards, partitions=1, val_split=0):
    rng = random.Random(42)
    if partitions == 2:
        num_val = int(val_split / 100 * len(frames))
        parts = [frames[:num_val], frames[num_val:]]
        for part in parts:
            rng.shuffle(part)
    else:
        parts = [list(frames)]
    for part in parts:
        rng.shuffle(part)
    out = []
    for part in [p for p in parts if p]:
        size = math.ceil(len(part) / num_shards)
        shards = []
        for i in range(num_shards):
            shard = part[i * size:(i + 1) * size]
            if (i + 1) * size > len(part):
                shard = part[i * size:] + rng.sample(part, (i + 1) * size - len(part))
            shards.append(shard)
        out.append(shards)
    return out


# Each frame's boxes as TAO's default mapping keeps them: (category id, bbox).
EXPECTED_BOXES = {
    "000001": [(1, [1.0, 2.0, 10.0, 20.0])],                              # car: not a class; dropped
    "000002": [(1, [5.5, 1.5, 15.0, 17.5]), (3, [30.0, 2.0, 10.0, 10.0])],  # a column with a float: floats
    "000003": [(2, [3, 3, 6, 6]), (1, [10, 10, 20, 20])],                  # integers only: ints
    "000004": [],
    "000005": [(3, [1, 1, 3, 3])],                                        # zero-width box dropped
}


def expected_coco(shard_frames, source, first_image_id, first_ann_id, sizes):
    images, annotations = [], []
    for offset, frame in enumerate(shard_frames):
        width, height = sizes[frame]
        images.append({"id": first_image_id + offset, "file_name": f"{source}/images/{frame}.jpg",
                       "height": height, "width": width})
        for category_id, bbox in EXPECTED_BOXES[frame]:
            annotations.append({"image_id": first_image_id + offset, "category_id": category_id,
                                "id": first_ann_id + len(annotations), "bbox": bbox, "area": bbox[2] * bbox[3],
                                "iscrowd": 0})
    categories = [{"supercategory": "person", "id": 1, "name": "person"},
                  {"supercategory": "face", "id": 2, "name": "face"},
                  {"supercategory": "bag", "id": 3, "name": "bag"}]
    return {"images": images, "annotations": annotations, "categories": categories}


SIZES = {stem: size for stem, (size, _lines) in LABELS.items()}


def test_one_source_is_written_as_taos_converter_writes_it(tmp_path, capsys):
    make_kitti_source(tmp_path)
    code, out = run_convert(tmp_path, num_shards=2)
    assert code == 0
    names = sorted(os.listdir(out / "a"))
    assert names == ["a-shard-00000-of-00002.json", "a-shard-00001-of-00002.json"]
    (shards,) = tao_shards(tao_frames(tmp_path / "a" / "images"), 2)
    assert [len(s) for s in shards] == [3, 3]          # 5 frames: the second shard repeats one
    assert shards[1][2] in shards[0] + shards[1][:2]
    image_id = ann_id = 0
    for name, frames in zip(names, shards):
        expected = expected_coco(frames, "a", image_id, ann_id, SIZES)
        # The file itself, byte for byte: json.dump's separators, TAO's key order.
        assert (out / "a" / name).read_text() == json.dumps(expected)
        image_id += len(expected["images"])
        ann_id += len(expected["annotations"])
    assert (out / "stats.txt").read_text() == f"a,6,{ann_id}\n"   # the next ids, TAO's counters
    printed = capsys.readouterr().out
    assert "skipped boxes of unmapped classes (car: 1)" in printed
    assert "skipped 1 box(es) with non-positive width or height" in printed
    assert "num_classes: 4" in printed
    assert not [f for f in glob.glob(str(out / "**" / ".*"), recursive=True)]  # no temporary files left


def test_ids_continue_over_sources_and_later_runs(tmp_path):
    make_kitti_source(tmp_path, name="a")
    make_kitti_source(tmp_path, name="b", labels={k: LABELS[k] for k in ("000002", "000003")})
    code, out = run_convert(tmp_path, sources=("a", "b"), num_shards=1)
    assert code == 0
    a = load(out / "a" / "a-shard-00000-of-00001.json")
    b = load(out / "b" / "b-shard-00000-of-00001.json")
    assert [i["id"] for i in a["images"]] == [0, 1, 2, 3, 4]
    assert [i["id"] for i in b["images"]] == [5, 6]
    assert [x["id"] for x in a["annotations"]] == [0, 1, 2, 3, 4, 5]
    assert [x["id"] for x in b["annotations"]] == [6, 7, 8, 9]
    assert {i["file_name"].split("/")[0] for i in b["images"]} == {"b"}
    assert (out / "stats.txt").read_text() == "a,5,6\nb,7,10\n"
    # TAO reads its counters back: converting again into the same folder numbers on.
    make_kitti_source(tmp_path, name="c", labels={"000004": LABELS["000004"]})
    code, out = run_convert(tmp_path, sources=("c",), num_shards=1)
    assert code == 0
    assert [i["id"] for i in load(out / "c" / "c-shard-00000-of-00001.json")["images"]] == [7]
    assert (out / "stats.txt").read_text() == "a,5,6\nb,7,10\nc,8,10\n"


def test_random_partition_mode_folds_and_val_split(tmp_path):
    labels = {f"{k:06d}": ((8 + k, 8), ["person 0 0 0 1 1 5 5 0 0 0 0 0 0 0"]) for k in range(11)}
    make_kitti_source(tmp_path, labels=labels)
    code, out = run_convert(tmp_path, num_partitions=2, partition_mode="random", val_split=30, num_shards=2)
    assert code == 0
    names = sorted(os.listdir(out / "a"))
    assert names == [f"a-fold-{p:03d}-of-002-shard-{s:05d}-of-00002.json" for p in range(2) for s in range(2)]
    val, train = tao_shards(tao_frames(tmp_path / "a" / "images"), 2, partitions=2, val_split=30)
    written = [[os.path.basename(i["file_name"])[:-4] for i in load(out / "a" / n)["images"]] for n in names]
    assert written == [*val, *train]
    assert [len(s) for s in written] == [2, 2, 4, 4]      # 3 validation frames (30% of 11), 8 training
    ids = [i["id"] for n in names for i in load(out / "a" / n)["images"]]
    assert ids == list(range(12))


def test_val_split_zero_writes_the_training_frames_as_fold_0(tmp_path):
    # TAO writes no file for an empty partition and numbers the others in order.
    make_kitti_source(tmp_path)
    code, out = run_convert(tmp_path, num_partitions=2, partition_mode="random", val_split=0, num_shards=1)
    assert code == 0
    assert os.listdir(out / "a") == ["a-fold-000-of-002-shard-00000-of-00001.json"]


def test_sequence_mode_deals_out_whole_sources(tmp_path):
    for name in ("s0", "s1", "s2"):
        make_kitti_source(tmp_path, name=name, labels={"000002": LABELS["000002"]})
    code, out = run_convert(tmp_path, sources=("s0", "s1", "s2"), num_partitions=2, partition_mode="sequence",
                            num_shards=1)
    assert code == 0
    assert os.listdir(out / "s0") == ["s0-fold-000-of-002-shard-00000-of-00001.json"]
    assert os.listdir(out / "s1") == ["s1-fold-001-of-002-shard-00000-of-00001.json"]
    assert os.listdir(out / "s2") == ["s2-fold-000-of-002-shard-00000-of-00001.json"]


def test_sizes_are_after_exif_orientation(tmp_path):
    make_kitti_source(tmp_path, labels={"000001": LABELS["000001"]})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show: the 40x30 pixels are seen 30 wide, 40 high
    Image.new("RGB", (40, 30)).save(tmp_path / "a" / "images" / "000001.jpg", exif=exif.tobytes())
    code, out = run_convert(tmp_path, num_shards=1)
    assert code == 0
    (image,) = load(out / "a" / "a-shard-00000-of-00001.json")["images"]
    assert (image["width"], image["height"]) == (30, 40)
    # The loaders read the image as shown too, so the shard trains as it is.
    spec = spec_from_dict({"dataset": {
        "train_data_sources": [{"image_dir": str(tmp_path), "json_file": str(out / "a" / "*.json")}],
        "num_classes": 4, "workers": 0, "augmentation": {"test_random_resize": 32, "fixed_padding": False}}})
    _pixels, target = build_dataset(spec, "train")[0]
    assert target["orig_size"].tolist() == [40, 30]


def test_a_short_partition_that_cannot_be_filled_is_one_clear_line(tmp_path, capsys):
    make_kitti_source(tmp_path, labels={"000001": LABELS["000001"]})
    code, out = run_convert(tmp_path, num_shards=3)
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "deformable-detr convert: error: convert.num_shards: 3 shards of the 1 image(s) of a's partition 0 would "
        "repeat more images than it has to fill the last shards; accepted: at most 1 for this source")


def test_converted_shards_load_as_a_training_source(tmp_path):
    make_kitti_source(tmp_path)
    code, out = run_convert(tmp_path, num_shards=3)
    assert code == 0
    spec = spec_from_dict({"dataset": {
        "train_data_sources": [{"image_dir": str(tmp_path), "json_file": str(out / "a" / "*.json")}],
        "num_classes": 4, "workers": 0, "augmentation": {"test_random_resize": 32, "fixed_padding": False}}})
    dataset = build_dataset(spec, "train")
    assert len(dataset) == 6 and len(dataset.json_files) == 3    # 5 frames and one repeat: 2 per shard
    assert sorted(dataset.coco.getImgIds()) == list(range(1, 7))  # the loader numbers the merged shards anew


def test_taos_flat_convert_spec_runs(tmp_path):
    data = tmp_path / "data"
    make_kitti_source(data, name="seq")
    (tmp_path / "sources.txt").write_text("seq\n")
    spec_path = tmp_path / "convert.yaml"
    spec_path.write_text(yaml.safe_dump({
        "input_source": str(tmp_path / "sources.txt"), "data_root": str(data), "results_dir": str(tmp_path / "out"),
        "image_dir_name": "images", "label_dir_name": "labels", "num_shards": 1, "num_partitions": 1,
        "partition_mode": None, "val_split": 0, "image_extension": ".jpg", "mapping_path": None}))
    assert main(["convert", "-e", str(spec_path)]) == 0
    shard = load(tmp_path / "out" / "seq" / "seq-shard-00000-of-00001.json")  # in results_dir itself, as TAO
    assert all((data / image["file_name"]).is_file() for image in shard["images"])


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
    # A mapping file's categories: {id, name} in reverse alphabetical order (TAO adds no supercategory).
    assert shard["categories"] == [{"id": 1, "name": "walker"}, {"id": 2, "name": "thing"}]
    assert sorted(a["category_id"] for a in shard["annotations"]) == [1, 1, 2]  # backpack, face... unmapped


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
