"""Read one COCO-format source, check it, and return its annotations as columns.

Every problem a user can cause ends in one `UsageError` naming the file and the entry.
Boxes with non-positive width or height, boxes with a NaN or infinite coordinate, and boxes
entirely outside their image (when the image's width and height are given) are skipped, counted
and warned about; crowd boxes are kept apart (evaluation scores them as
"ignore", training drops them). A source's `width`/`height` are checked against the pixels
when each image is first decoded (dataset.py); 0 or absent means "not given".
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError, relative_to_cwd
from ..runtime.logging import get_logger
from . import remote

log = get_logger("data")


@dataclass
class SourceColumns:
    """One source's images and non-crowd, valid boxes as flat arrays."""

    json_file: str
    image_dir: str
    image_ids: np.ndarray        # int64 [I], ids as in the JSON
    file_names: list[str]        # [I], relative to image_dir (or absolute)
    heights: np.ndarray          # int32 [I]
    widths: np.ndarray           # int32 [I]
    box_image_index: np.ndarray  # int64 [A], index into the image arrays
    boxes_xywh: np.ndarray       # float32 [A, 4], pixels, as in the JSON
    category_ids: np.ndarray     # int64 [A]
    categories: list[dict]       # the JSON's category list
    skipped_boxes: int           # boxes with non-positive width or height
    crowd_boxes: int             # crowd boxes (not in the columns)
    nonfinite_boxes: int = 0     # boxes with a NaN or infinite coordinate (not in the columns)
    outside_boxes: int = 0       # boxes entirely outside their image's width x height (not in the columns)
    annotations_key: bool = True  # False when the JSON has no 'annotations' key at all

    @property
    def num_boxes(self) -> int:
        """Boxes a model can learn from or be scored against (crowd boxes are only "ignore" regions)."""
        return len(self.boxes_xywh)


def expand_json_files(pattern: str, field: str) -> list[str]:
    """`json_file` may name one file or a glob of shards (what `convert` writes)."""
    if not pattern:
        raise UsageError(f"{field}: not set; expected a COCO JSON file (or a glob of shards)")
    if any(ch in pattern for ch in "*?["):
        files = remote.glob(pattern)
        if not files:
            raise UsageError(f"{field}: no file matches {pattern}" + relative_to_cwd(pattern))
        return files
    if not remote.is_s3(pattern) and os.path.isdir(pattern):
        raise UsageError(f"{field}: {pattern} is a folder, expected a file (COCO JSON)")
    if not remote.is_file(pattern):
        raise UsageError(f"{field}: file not found: {pattern}" + relative_to_cwd(pattern))
    return [pattern]


def read_json(path: str) -> Any:
    """Parse a JSON file; a syntax error names the line and column."""
    try:
        with remote.open_file(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found" + relative_to_cwd(path)) from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, expected a file (COCO JSON)") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _require_list(raw: dict, key: str, path: str) -> list:
    value = raw.get(key)
    if not isinstance(value, list):
        raise UsageError(f"{path}: '{key}' must be a list (COCO format: images, annotations, categories)")
    return value


def check_category_id(cat_id: Any, num_classes: int, where: str, max_id: int) -> None:
    if isinstance(cat_id, bool) or not isinstance(cat_id, int):
        raise UsageError(f"{where}: category_id {cat_id!r} is not an integer")
    if cat_id <= 0:
        raise UsageError(f"{where}: category_id {cat_id}; 0 is the background, category ids start at 1")
    if cat_id >= num_classes:
        raise UsageError(f"{where}: category_id {cat_id} is not below dataset.num_classes={num_classes}; "
                         f"set dataset.num_classes to max id + 1 = {max_id + 1}")


def _max_category_id(raw_annotations: list, categories: list) -> int:
    ids = [a.get("category_id") for a in raw_annotations if isinstance(a, dict)]
    ids += [c.get("id") for c in categories if isinstance(c, dict)]
    ints = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    return max(ints, default=0)


def load_source(json_file: str, image_dir: str, num_classes: int, check_files: bool = True) -> SourceColumns:
    """Read and check one COCO JSON; return its images and boxes as columns."""
    raw = read_json(json_file)
    if not isinstance(raw, dict):
        raise UsageError(f"{json_file}: expected a JSON object with images, annotations, categories")
    images = _require_list(raw, "images", json_file)
    has_annotations_key = "annotations" in raw
    annotations = raw.get("annotations", [])
    if not isinstance(annotations, list):
        raise UsageError(f"{json_file}: 'annotations' must be a list")
    categories = raw.get("categories", [])
    if not isinstance(categories, list):
        raise UsageError(f"{json_file}: 'categories' must be a list")
    max_id = _max_category_id(annotations, categories)
    for k, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat:
            raise UsageError(f"{json_file}: categories[{k}] has no 'id'")
        check_category_id(cat["id"], num_classes, f"{json_file}: categories[{k}] ({cat.get('name', '?')})", max_id)

    index_of_id: dict[int, int] = {}
    file_names: list[str] = []
    heights = np.empty(len(images), np.int32)
    widths = np.empty(len(images), np.int32)
    image_ids = np.empty(len(images), np.int64)
    for k, image in enumerate(images):
        where = f"{json_file}: images[{k}]"
        try:
            image_id, file_name = int(image["id"]), str(image["file_name"])
            height, width = int(image.get("height", 0)), int(image.get("width", 0))
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{where}: needs integer 'id', 'file_name', 'height' and 'width'") from None
        if image_id in index_of_id:
            raise UsageError(f"{where}: image id {image_id} appears twice")
        if check_files and not remote.is_file(os.path.join(image_dir, file_name)):
            raise UsageError(f"{where}: image file not found: {os.path.join(image_dir, file_name)}")
        index_of_id[image_id] = k
        image_ids[k], heights[k], widths[k] = image_id, height, width
        file_names.append(file_name)

    box_image_index, boxes, category_ids = [], [], []
    skipped = crowd = nonfinite = outside = 0
    for k, ann in enumerate(annotations):
        where = f"{json_file}: annotations[{k}] (id {ann.get('id', '?') if isinstance(ann, dict) else '?'})"
        if not isinstance(ann, dict):
            raise UsageError(f"{where}: expected an object")
        check_category_id(ann.get("category_id"), num_classes, where, max_id)
        image_index = index_of_id.get(ann.get("image_id"))
        if image_index is None:
            raise UsageError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise UsageError(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):  # json reads NaN, Infinity and 1e999 as floats
            nonfinite += 1
            continue
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            skipped += 1
            continue
        if _entirely_outside(bbox, int(widths[image_index]), int(heights[image_index])):
            outside += 1
            continue
        box_image_index.append(image_index)
        boxes.append(bbox)
        category_ids.append(ann["category_id"])
    if skipped:
        log.warning("%s: skipped %d box(es) with non-positive width or height", json_file, skipped)
    if nonfinite:
        log.warning("%s: skipped %d box(es) with a NaN or infinite coordinate", json_file, nonfinite)
    if outside:
        log.warning("%s: skipped %d box(es) entirely outside their image's width and height", json_file, outside)
    return SourceColumns(
        json_file=json_file, image_dir=image_dir, image_ids=image_ids, file_names=file_names,
        heights=heights, widths=widths,
        box_image_index=np.asarray(box_image_index, np.int64).reshape(-1),
        boxes_xywh=np.asarray(boxes, np.float32).reshape(-1, 4),
        category_ids=np.asarray(category_ids, np.int64).reshape(-1),
        categories=categories, skipped_boxes=skipped, crowd_boxes=crowd, nonfinite_boxes=nonfinite,
        outside_boxes=outside, annotations_key=has_annotations_key)


def _entirely_outside(bbox: list, width: int, height: int) -> bool:
    """Whether [x, y, w, h] has no pixel inside a width x height image (0 = size not given: unknown)."""
    x, y, w, h = bbox
    return bool((width and (x >= width or x + w <= 0)) or (height and (y >= height or y + h <= 0)))


def describe_no_boxes(sources: list[SourceColumns]) -> str:
    """Why a split has no usable box, file by file: "a.json (no 'annotations' key), b.json (...)"."""
    parts = []
    for src in sources:
        if not src.annotations_key:
            why = "no 'annotations' key"
        elif src.num_boxes == 0 and not (src.skipped_boxes or src.nonfinite_boxes or src.crowd_boxes
                                         or src.outside_boxes):
            why = "'annotations' is empty"
        else:
            why = (f"all boxes unusable: {src.skipped_boxes} empty, {src.nonfinite_boxes} NaN/infinite, "
                   f"{src.outside_boxes} outside the image, {src.crowd_boxes} crowd")
        parts.append(f"{src.json_file} ({why})")
    return ", ".join(parts)
