"""COCO-format detection datasets for the train, val and test splits."""
from __future__ import annotations

import gc
import os
from functools import cached_property
from typing import Any, Optional, Sequence

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..config.schema import DataSource, ExperimentConfig
from ..errors import UsageError, relative_to_cwd
from ..runtime.logging import get_logger
from ..runtime.progress import progress
from .annotations import AnnotationStore, build_store
from .coco_gt import merged_coco
from .coco_json import describe_no_boxes, expand_json_files, load_source
from . import remote
from .images import ImageSizeMismatch, UnreadableImageError, load_image
from .transforms import Transform, build_eval_transform, build_train_transform

log = get_logger("data")

SPLITS = ("train", "val", "test")


class CocoDetection(Dataset):
    """Images and boxes of one or several COCO sources, merged, with a transform.

    Items are `(image [3, H, W] float normalised, target)`; target has `boxes`
    (float [n, 4] cxcywh relative to the transformed image), `labels` (int64 [n],
    category ids as in the JSON), `image_id` (int64 scalar), `orig_size` and `size`
    (int64 [2], h w). Crowd boxes are not in targets.

    `require_boxes` ("train" or "score") refuses a split with no usable box at all: training
    on it teaches nothing and scoring against it gives AP -1. Each image's JSON width and
    height must match its pixels as shown (after EXIF orientation, as TAO reads them; see images.py).
    """

    def __init__(self, sources: Sequence[DataSource], num_classes: int, transform: Transform,
                 dataset_type: str = "serialized", field: str = "dataset", check_files: bool = True,
                 decode_images: bool = True, require_boxes: Optional[str] = None) -> None:
        if not sources:
            raise UsageError(f"{field}: no data source; expected a list of {{image_dir, json_file}}")
        columns = []
        self.json_files: list[str] = []
        self.source_of_json: list[int] = []
        for k, src in enumerate(sources):
            where = f"{field}[{k}]"
            if not src.image_dir:
                raise UsageError(f"{where}.image_dir: not set; expected the folder holding the images")
            if check_files and remote.is_file(src.image_dir):
                raise UsageError(f"{where}.image_dir: {src.image_dir} is a file, expected a folder of images")
            if check_files and not remote.is_dir(src.image_dir):
                raise UsageError(f"{where}.image_dir: folder not found: {src.image_dir}"
                                 + relative_to_cwd(src.image_dir))
            for json_file in expand_json_files(src.json_file, f"{where}.json_file"):
                columns.append(load_source(json_file, src.image_dir, num_classes, check_files))
                self.json_files.append(json_file)
                self.source_of_json.append(k)
        self.num_images_per_json = [len(c.image_ids) for c in columns]
        self.skipped_boxes = sum(c.skipped_boxes for c in columns)
        self.outside_boxes = sum(c.outside_boxes for c in columns)
        if require_boxes and columns and not any(c.num_boxes for c in columns):
            purpose = ("to train on; a training set needs annotated boxes" if require_boxes == "train"
                       else "to score against; evaluation needs ground truth")
            raise UsageError(f"{field}: no boxes {purpose}: {describe_no_boxes(columns)}")
        self.store: AnnotationStore = build_store(columns, dataset_type)
        del columns
        gc.collect()  # the parsed JSON is garbage now; return it before workers fork
        if len(self.store) == 0:
            raise UsageError(f"{field}: the annotation files list no images: {', '.join(self.json_files)}")
        self.transform = transform
        self.decode_images = decode_images
        self.remote_images = any(remote.is_s3(src.image_dir) for src in sources)  # read ahead (data/prefetch.py)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def source_index(self):
        """int64 [N]: index of the JSON file (shard) each image came from."""
        return self.store.source_index

    @cached_property
    def coco(self) -> COCO:
        """Ground truth for scoring (built on first use: workers forked earlier never hold it)."""
        return merged_coco(self.json_files)

    def unusable_images(self, indices: Sequence[int], show_progress: bool = True) -> list[str]:
        """Why each of these items' images cannot be used (unreadable, empty, a size unlike the annotation
        file's), one line each: the checks training's first read would make, made now (dataset.verify_images)."""
        problems = []
        for index in progress(indices, desc="checking images", enabled=show_progress):
            record = self.store.record(index)
            try:
                _check_size(record.path, load_image(record.path).shape[-2:], record.height, record.width)
            except UnreadableImageError as err:
                problems.append(str(err))
        return problems

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.store.record(index)
        if self.decode_images:
            image = load_image(record.path)
            _check_size(record.path, image.shape[-2:], record.height, record.width)
        else:  # benchmarks of annotation handling only
            image = tv_tensors.Image(torch.zeros(3, max(record.height, 1), max(record.width, 1), dtype=torch.uint8))
        height, width = image.shape[-2:]
        boxes = torch.from_numpy(record.boxes_xywh)
        boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # boxes wholly off the image
        if not bool(keep.all()):  # only where the JSON gives no size: load_source drops the others, counted
            log.warning("%s: dropped %d box(es) entirely outside the %dx%d image", record.path,
                        int((~keep).sum()), width, height)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(record.category_ids)[keep],
        }
        image, target = self.transform(image, target)
        target["image_id"] = torch.tensor(record.image_id, dtype=torch.int64)
        target["orig_size"] = torch.tensor([height, width], dtype=torch.int64)
        return image.as_subclass(torch.Tensor), target


def _check_size(path: str, decoded_hw, height: int, width: int) -> None:
    """The JSON's height/width (0 = not given) against the decoded pixels; one line naming the image."""
    actual_h, actual_w = int(decoded_hw[0]), int(decoded_hw[1])
    if (height and height != actual_h) or (width and width != actual_w):
        hint = (" (swapped: the JSON lists the size as stored, before EXIF orientation; images are read "
                "as shown, after it, as TAO reads them)" if (height, width) == (actual_w, actual_h) else "")
        raise ImageSizeMismatch(f"{path}: the annotation file lists width {width}, height {height}, but the "
                                f"image is {actual_w}x{actual_h}{hint}; fix the JSON's width/height (and its "
                                "boxes, if they were made for another image)")


def split_sources(spec: ExperimentConfig, split: str) -> tuple[list[DataSource], str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dataset = spec.dataset
    if split == "train":
        return list(dataset.train_data_sources), "dataset.train_data_sources"
    if split == "val":
        return list(dataset.val_data_sources), "dataset.val_data_sources"
    test = dataset.test_data_sources
    return ([test] if test is not None else []), "dataset.test_data_sources"


def build_dataset(spec: ExperimentConfig, split: str, verify_images: bool = False,
                  transform: Optional[Transform] = None) -> CocoDetection:
    """The dataset of a split; train has TAO's training augmentation, val/test the eval resize.

    Files are checked to exist up front; images are decoded (and a corrupt one reported) when first
    loaded, or all up front with `verify_images=True` (the first unusable one raised); training's
    loader skips an unusable one (loader.SkipUnusable), and dataset.verify_images has training check
    them all first (tasks/train/loop.py).
    """
    sources, field = split_sources(spec, split)
    aug = spec.dataset.augmentation
    if transform is None:
        transform = build_train_transform(aug) if split == "train" else build_eval_transform(aug)
    dataset = CocoDetection(sources, spec.dataset.num_classes, transform, spec.dataset.dataset_type, field,
                            require_boxes="train" if split == "train" else "score")
    if verify_images:
        problems = dataset.unusable_images(range(len(dataset)))
        if problems:
            raise UnreadableImageError(problems[0])
    log.info("%s: %d images from %d annotation file(s)", field, len(dataset), len(dataset.json_files))
    return dataset
