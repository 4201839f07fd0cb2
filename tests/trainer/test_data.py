"""Datasets, validation, collate, samplers and loaders on small real COCO files and images."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from deformable_detr.config.loader import spec_from_dict
from deformable_detr.data import (InferenceImages, UnreadableImageError, build_dataloader, build_dataset,
                                  build_eval_transform, collate_fn, read_classmap)
from deformable_detr.data.transforms import FixedCanvas
from deformable_detr.errors import UsageError

SMALL_AUG = {"scales": [64, 80], "train_random_resize": [64, 72], "train_random_crop_min": 40,
             "train_random_crop_max": 60, "random_resize_max_size": 96, "test_random_resize": 64,
             "fixed_padding": False}


def make_spec(tiny_coco, **dataset):
    raw = {"dataset": {"train_data_sources": [tiny_coco["train"]], "val_data_sources": [tiny_coco["val"]],
                       "test_data_sources": tiny_coco["val"], "num_classes": tiny_coco["num_classes"],
                       "batch_size": 2, "workers": 0, "augmentation": dict(SMALL_AUG), **dataset}}
    return spec_from_dict(raw)


def write_coco(folder, images, annotations, categories=None, image_size=(16, 24)):
    """A COCO JSON in `folder` whose images are real small JPEGs."""
    from PIL import Image

    os.makedirs(folder / "images", exist_ok=True)
    for image in images:
        Image.new("RGB", image_size[::-1], (90, 90, 90)).save(folder / "images" / image["file_name"])
    coco = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (folder / "ann.json").write_text(json.dumps(coco, indent=1))
    return {"image_dir": str(folder / "images"), "json_file": str(folder / "ann.json")}


def image_entry(image_id, name=None, h=16, w=24):
    return {"id": image_id, "file_name": name or f"{image_id}.jpg", "height": h, "width": w}


def box_entry(ann_id, image_id, bbox, category_id=1, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": category_id, "iscrowd": iscrowd,
            "area": bbox[2] * bbox[3]}


def spec_for(source, num_classes=3, **dataset):
    return spec_from_dict({"dataset": {"train_data_sources": [source], "val_data_sources": [source],
                                       "num_classes": num_classes, "workers": 0, "batch_size": 2,
                                       "augmentation": dict(SMALL_AUG), **dataset}})


@pytest.fixture
def warnings_logged():
    """Warnings of the deformable_detr loggers (which may not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = ListHandler(level=logging.WARNING)
    logger = logging.getLogger("deformable_detr")
    logger.addHandler(handler)
    yield lambda: "\n".join(r.getMessage() for r in records)
    logger.removeHandler(handler)


# ---------------------------------------------------------------- items and ground truth

@pytest.mark.parametrize("dataset_type", ["serialized", "default"])
def test_val_items_match_the_json(tiny_coco, dataset_type):
    spec = make_spec(tiny_coco, dataset_type=dataset_type)
    dataset = build_dataset(spec, "val")
    raw = json.loads(open(tiny_coco["val"]["json_file"]).read())
    assert len(dataset) == len(raw["images"])
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 64, 64)
        assert set(target) >= {"boxes", "labels", "image_id", "orig_size", "size"}
        assert target["labels"].dtype == torch.int64 and target["image_id"].dtype == torch.int64
        assert target["orig_size"].tolist() == [64, 64] and target["size"].tolist() == [64, 64]
        image_id = int(target["image_id"])
        anns = [a for a in raw["annotations"] if a["image_id"] == image_id]
        # 64 -> 64: boxes are the JSON's, as cxcywh / 64.
        expected = torch.tensor([[(x + w / 2) / 64, (y + h / 2) / 64, w / 64, h / 64]
                                 for x, y, w, h in (a["bbox"] for a in anns)])
        assert torch.allclose(target["boxes"], expected, atol=1e-6)
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
    assert sorted(dataset.coco.getImgIds()) == sorted(i["id"] for i in raw["images"])


def test_serialized_and_default_give_identical_items(tiny_coco):
    a = build_dataset(make_spec(tiny_coco, dataset_type="serialized"), "train")
    b = build_dataset(make_spec(tiny_coco, dataset_type="default"), "train")
    for index in range(len(a)):
        torch.manual_seed(index)
        image_a, target_a = a[index]
        torch.manual_seed(index)
        image_b, target_b = b[index]
        assert torch.equal(image_a, image_b)
        for key in ("boxes", "labels", "image_id", "orig_size", "size"):
            assert torch.equal(target_a[key], target_b[key])


def test_train_items_are_augmented_within_bounds(tiny_coco):
    dataset = build_dataset(make_spec(tiny_coco), "train")
    torch.manual_seed(0)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert tuple(image.shape[-2:]) == tuple(target["size"].tolist())
        assert max(image.shape[-2:]) <= 96
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        assert len(target["boxes"]) == len(target["labels"])


def test_several_sources_get_unique_ids_consistent_with_coco(tiny_coco):
    spec = spec_from_dict({"dataset": {"val_data_sources": [tiny_coco["train"], tiny_coco["val"]],
                                       "num_classes": 4, "workers": 0,
                                       "augmentation": dict(SMALL_AUG)}})
    dataset = build_dataset(spec, "val")
    assert len(dataset) == 12
    ids = [int(dataset[i][1]["image_id"]) for i in range(len(dataset))]
    assert ids == list(range(1, 13))
    coco = dataset.coco
    assert sorted(coco.getImgIds()) == ids
    for index in (0, 9):
        _, target = dataset[index]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(target["image_id"])]))
        assert [a["category_id"] for a in anns] == target["labels"].tolist()
        x, y, w, h = anns[0]["bbox"]
        assert torch.allclose(target["boxes"][0], torch.tensor([(x + w / 2) / 64, (y + h / 2) / 64, w / 64, h / 64]))
    # The second source's first image comes from the val folder.
    assert coco.loadImgs([9])[0]["file_name"] == "00001.jpg"
    assert list(dataset.source_index) == [0] * 8 + [1] * 4


def test_json_file_glob_reads_every_shard(tiny_coco, tmp_path):
    raw = json.loads(open(tiny_coco["train"]["json_file"]).read())
    for part in range(2):
        images = raw["images"][part * 4:(part + 1) * 4]
        ids = {i["id"] for i in images}
        shard = {**raw, "images": images, "annotations": [a for a in raw["annotations"] if a["image_id"] in ids]}
        (tmp_path / f"shard-{part}.json").write_text(json.dumps(shard))
    spec = spec_for({"image_dir": tiny_coco["train"]["image_dir"], "json_file": str(tmp_path / "shard-*.json")},
                    num_classes=4)
    dataset = build_dataset(spec, "train")
    assert len(dataset) == 8 and len(dataset.json_files) == 2


# ---------------------------------------------------------------- validation

def test_category_id_zero_is_refused(tmp_path):
    source = write_coco(tmp_path, [image_entry(1)], [box_entry(7, 1, [1, 1, 4, 4], category_id=0)])
    with pytest.raises(UsageError, match=r"ann.json: annotations\[0\] \(id 7\).*category_id 0.*start at 1"):
        build_dataset(spec_for(source), "train")


def test_category_id_not_below_num_classes_names_the_fix(tmp_path):
    source = write_coco(tmp_path, [image_entry(1)], [box_entry(1, 1, [1, 1, 4, 4], category_id=2),
                                                    box_entry(2, 1, [1, 1, 4, 4], category_id=5)],
                        categories=[{"id": 2, "name": "b"}, {"id": 5, "name": "e"}])
    with pytest.raises(UsageError, match=r"categories\[1\].*category_id 5.*set dataset.num_classes to max id \+ 1 = 6"):
        build_dataset(spec_for(source, num_classes=3), "train")


def test_missing_image_file_is_named(tmp_path):
    source = write_coco(tmp_path, [image_entry(1), image_entry(2)], [])
    os.remove(tmp_path / "images" / "2.jpg")
    with pytest.raises(UsageError, match=r"images\[1\]: image file not found: .*2.jpg"):
        build_dataset(spec_for(source), "train")


def test_malformed_json_names_line_and_column(tmp_path):
    source = write_coco(tmp_path, [image_entry(1)], [])
    text = (tmp_path / "ann.json").read_text().splitlines()
    assert text[1].strip() == '"images": ['
    text[1] = text[1] + ","  # '"images": [,' is a syntax error on line 2
    (tmp_path / "ann.json").write_text("\n".join(text))
    with pytest.raises(UsageError, match=r"ann.json: malformed JSON at line 2, column 13"):
        build_dataset(spec_for(source), "train")


def test_non_positive_boxes_are_skipped_and_counted(tmp_path, warnings_logged):
    source = write_coco(tmp_path, [image_entry(1)], [box_entry(1, 1, [1, 1, 4, 4]), box_entry(2, 1, [1, 1, 0, 4]),
                                                     box_entry(3, 1, [1, 1, 4, -2])])
    dataset = build_dataset(spec_for(source), "val")
    assert dataset.skipped_boxes == 2
    assert "skipped 2 box(es) with non-positive width or height" in warnings_logged()
    assert len(dataset[0][1]["boxes"]) == 1
    assert len(dataset.coco.getAnnIds()) == 1


def test_crowd_boxes_are_not_in_targets_but_are_in_the_ground_truth(tmp_path):
    source = write_coco(tmp_path, [image_entry(1)], [box_entry(1, 1, [1, 1, 4, 4]),
                                                     box_entry(2, 1, [2, 2, 8, 8], category_id=2, iscrowd=1)])
    spec = spec_for(source)
    # The training split, with the deterministic eval resize so no crop can remove a box.
    dataset = build_dataset(spec, "train", transform=build_eval_transform(spec.dataset.augmentation))
    assert dataset[0][1]["labels"].tolist() == [1]
    crowd = [a for a in dataset.coco.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["category_id"] == 2


def test_undecodable_image_fails_lazily_or_early_with_one_line(tmp_path):
    source = write_coco(tmp_path, [image_entry(1), image_entry(2)], [box_entry(1, 1, [1, 1, 4, 4])])
    (tmp_path / "images" / "2.jpg").write_bytes(b"not an image at all")
    spec = spec_for(source, batch_size=1)
    dataset = build_dataset(spec, "val")  # files exist: decoding is checked on load
    dataset[0]
    with pytest.raises(UnreadableImageError, match=r"2.jpg: cannot decode image"):
        dataset[1]
    with pytest.raises(UnreadableImageError, match=r"2.jpg: cannot decode image"):
        build_dataset(spec, "val", verify_images=True)


def test_undecodable_image_in_a_worker_still_reports_one_line(tmp_path):
    source = write_coco(tmp_path, [image_entry(1)], [box_entry(1, 1, [1, 1, 4, 4])])
    (tmp_path / "images" / "1.jpg").write_bytes(b"garbage")
    loader = build_dataloader(spec_for(source, workers=1, batch_size=1), "val")
    with pytest.raises(UsageError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "\n" not in message and message.endswith("1.jpg: cannot decode image (cannot identify image file "
                                                    f"'{tmp_path / 'images' / '1.jpg'}')")


def test_missing_sources_and_files_are_usage_errors(tmp_path):
    spec = spec_from_dict({"dataset": {"num_classes": 4}})
    with pytest.raises(UsageError, match="dataset.train_data_sources: no data source"):
        build_dataset(spec, "train")
    spec = spec_for({"image_dir": str(tmp_path), "json_file": str(tmp_path / "nope.json")})
    with pytest.raises(UsageError, match=r"dataset.train_data_sources\[0\].json_file: file not found"):
        build_dataset(spec, "train")


# ---------------------------------------------------------------- collate

def test_collate_pads_to_largest_and_masks_padding():
    a = (torch.ones(3, 4, 6), {"image_id": torch.tensor(1)})
    b = (torch.full((3, 5, 3), 2.0), {"image_id": torch.tensor(2)})
    images, masks, targets = collate_fn([a, b])
    assert tuple(images.shape) == (2, 3, 5, 6) and tuple(masks.shape) == (2, 5, 6)
    assert masks.dtype == torch.bool
    assert not masks[0, :4, :6].any() and masks[0, 4:].all()
    assert not masks[1, :5, :3].any() and masks[1, :, 3:].all()
    assert torch.equal(images[0, :, :4, :6], a[0]) and (images[0, :, 4:] == 0).all()
    assert torch.equal(images[1, :, :, :3], b[0]) and (images[1, :, :, 3:] == 0).all()
    assert [int(t["image_id"]) for t in targets] == [1, 2]


def test_collate_fixed_padding():
    a = (torch.ones(3, 4, 6), {"image_id": torch.tensor(1)})
    images, masks, _ = collate_fn([a], pad_to=FixedCanvas(8, 8))
    assert tuple(images.shape) == (1, 3, 8, 8) and int((~masks).sum()) == 24
    with pytest.raises(UsageError, match="larger than its fixed canvas"):
        collate_fn([a], pad_to=FixedCanvas(4, 4))


# ---------------------------------------------------------------- samplers and loaders

def epoch_indices(spec, split, rank, world, epoch, dataset):
    loader = build_dataloader(spec, split, rank=rank, world_size=world, dataset=dataset)
    loader.sampler.set_epoch(epoch)
    return list(loader.sampler)


def test_default_sampler_is_deterministic_sharded_and_reshuffled(tiny_coco):
    spec = make_spec(tiny_coco)
    dataset = build_dataset(spec, "train")
    first = epoch_indices(spec, "train", 0, 2, 0, dataset)
    assert first == epoch_indices(spec, "train", 0, 2, 0, dataset)
    other = epoch_indices(spec, "train", 1, 2, 0, dataset)
    assert sorted(first + other) == list(range(8))
    epochs = [epoch_indices(spec, "train", 0, 1, e, dataset) for e in range(4)]
    assert len({tuple(e) for e in epochs}) > 1


def test_eval_sampler_reads_every_image_once_over_ranks(tiny_coco):
    spec = make_spec(tiny_coco)
    dataset = build_dataset(spec, "val")
    parts = [epoch_indices(spec, "val", r, 3, 0, dataset) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(len(dataset)))
    assert parts[0] == [0, 3]


def test_uniform_sampler_balances_sources(tmp_path):
    big = write_coco(tmp_path / "big", [image_entry(i) for i in range(1, 31)], [box_entry(1, 1, [1, 1, 4, 4])])
    small = write_coco(tmp_path / "small", [image_entry(i) for i in range(1, 4)], [])
    spec = spec_from_dict({"dataset": {"train_data_sources": [big, small], "num_classes": 3, "workers": 0,
                                       "train_sampler": "uniform_sampler", "augmentation": dict(SMALL_AUG)}})
    dataset = build_dataset(spec, "train")
    drawn = []
    for epoch in range(40):
        drawn += epoch_indices(spec, "train", 0, 1, epoch, dataset)
    from_small = np.mean(np.asarray(drawn) >= 30)
    assert 0.4 < from_small < 0.6  # (N - n_s) / N weights: two sources are drawn equally often
    assert epoch_indices(spec, "train", 1, 2, 3, dataset) == epoch_indices(spec, "train", 1, 2, 3, dataset)
    assert len(epoch_indices(spec, "train", 1, 2, 3, dataset)) == 17


def test_non_uniform_sampler_deals_sources_to_ranks(tmp_path):
    sources = [write_coco(tmp_path / f"s{k}", [image_entry(i) for i in range(1, n + 1)], [box_entry(1, 1, [1, 1, 4, 4])])
               for k, n in enumerate([4, 2, 3])]
    spec = spec_from_dict({"dataset": {"train_data_sources": sources, "num_classes": 3, "workers": 0,
                                       "train_sampler": "non_uniform_sampler", "augmentation": dict(SMALL_AUG)}})
    dataset = build_dataset(spec, "train")
    rank0 = epoch_indices(spec, "train", 0, 2, 0, dataset)
    rank1 = epoch_indices(spec, "train", 1, 2, 0, dataset)
    assert len(rank0) == len(rank1) == 5
    assert set(rank0) <= {0, 1, 2, 3, 6, 7, 8} and len(set(rank0)) == 5  # sources 0 and 2, no repeats
    assert sorted(rank1) == [4, 4, 5, 5, 5] or sorted(rank1) == [4, 4, 4, 5, 5]  # source 1, cycled
    assert epoch_indices(spec, "train", 0, 2, 0, dataset) == rank0
    assert any(epoch_indices(spec, "train", 0, 2, e, dataset) != rank0 for e in range(1, 5))


def test_train_loader_batches(tiny_coco):
    spec = make_spec(tiny_coco)
    loader = build_dataloader(spec, "train")
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 4
    images, masks, targets = batches[0]
    assert images.shape[0] == 2 and masks.shape == (2, *images.shape[-2:]) and len(targets) == 2


@pytest.mark.parametrize("lsj, canvases", [(None, {"train": (80, 96), "val": (64, 96)}),
                                            (64, {"train": (64, 64), "val": (64, 64)})])
def test_fixed_padding_gives_constant_batch_shapes_with_workers(tiny_coco, lsj, canvases):
    """TAO's canvas follows the orientation; a batch mixing orientations pads to the larger of each side."""
    spec = make_spec(tiny_coco, workers=2, augmentation={**SMALL_AUG, "fixed_padding": True, "fixed_random_crop": lsj})
    for split in ("train", "val"):
        across, along = canvases[split]
        shapes = {tuple(images.shape[-2:]) for images, _, _ in build_dataloader(spec, split)}
        assert shapes and shapes <= {(across, along), (along, across), (along, along)}


def test_augmentation_is_reproducible_given_the_seed(tiny_coco):
    spec = make_spec(tiny_coco, workers=1)
    runs = [[images.sum().item() for images, _, _ in build_dataloader(spec, "train")] for _ in range(2)]
    assert runs[0] == runs[1]
    other = [images.sum().item() for images, _, _ in build_dataloader(spec, "train", seed=99)]
    assert other != runs[0]


# ---------------------------------------------------------------- inference images

def test_inference_images_skip_and_report_unreadable_files(tiny_coco, tmp_path, warnings_logged):
    import shutil

    folder = tmp_path / "infer"
    shutil.copytree(tiny_coco["val"]["image_dir"], folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (folder / "notes.txt").write_text("not an image")
    spec = spec_from_dict({"dataset": {"infer_data_sources": {"image_dir": [str(folder)]},
                                       "augmentation": dict(SMALL_AUG, test_random_resize=32)}})
    images = InferenceImages(spec)
    assert images.skipped == [str(folder / "broken.jpg")]
    assert "skipped 1 unreadable image(s) of 5" in warnings_logged()
    assert len(images) == 4
    image, target = images[0]
    assert tuple(image.shape) == (3, 32, 32)
    assert target["path"] == str(folder / "00001.jpg")
    assert target["orig_size"].tolist() == [64, 64] and target["size"].tolist() == [32, 32]


def test_read_classmap(tmp_path):
    path = tmp_path / "classmap.txt"
    path.write_text("circle\nsquare\n\n")
    assert read_classmap(str(path)) == ["circle", "square"]
    path.write_text("circle\n\nsquare\n")
    with pytest.raises(UsageError, match="line 2 is empty"):
        read_classmap(str(path))
    with pytest.raises(UsageError, match="classmap: file not found"):
        read_classmap(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("dataset_type", ["serialized", "default"])
def test_non_ascii_file_names(tmp_path, dataset_type):
    source = write_coco(tmp_path, [image_entry(1, name="bild ü 1.jpg")], [box_entry(1, 1, [1, 1, 4, 4])])
    dataset = build_dataset(spec_for(source, dataset_type=dataset_type), "val")
    assert dataset.store.record(0).path.endswith("bild ü 1.jpg")
    assert dataset[0][1]["labels"].tolist() == [1]
