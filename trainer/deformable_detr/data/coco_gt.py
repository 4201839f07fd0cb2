"""The ground truth of a split as one pycocotools COCO object, for scoring.

Image ids match the `image_id` of dataset targets: the JSON's own ids for a single
source, 1..N in source order for several (see `annotations.merged_image_ids`).
Boxes with non-positive width or height or a NaN/infinite coordinate are left out, as the dataset leaves them out;
crowd boxes stay (COCOeval treats them as "ignore" regions).
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Sequence

from pycocotools.coco import COCO

from ..errors import UsageError
from .coco_json import read_json


def _merge_categories(merged: dict[int, dict], categories: list[dict], json_file: str) -> None:
    for cat in categories:
        known = merged.get(cat["id"])
        if known is None:
            merged[cat["id"]] = dict(cat)
        elif known.get("name") != cat.get("name"):
            raise UsageError(f"{json_file}: category id {cat['id']} is named {cat.get('name')!r} here but "
                             f"{known.get('name')!r} in an earlier source; every source must use the same ids")


def merged_coco(json_files: Sequence[str]) -> COCO:
    """Read (already checked) COCO JSON files and merge them into one COCO index."""
    renumber = len(json_files) > 1
    images, annotations, categories = [], [], {}
    next_image_id = 1
    for json_file in json_files:
        raw = read_json(json_file)
        _merge_categories(categories, raw.get("categories", []), json_file)
        new_id = {}
        for image in raw["images"]:
            new_id[image["id"]] = next_image_id if renumber else image["id"]
            next_image_id += 1
            images.append({**image, "id": new_id[image["id"]]})
        for ann in raw.get("annotations", []):
            x, y, w, h = ann["bbox"]
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                continue
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": new_id[ann["image_id"]],
                                "area": ann.get("area", w * h), "iscrowd": int(ann.get("iscrowd", 0))})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": sorted(categories.values(), key=lambda c: c["id"])}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco
