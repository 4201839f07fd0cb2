"""KITTI label folders: class mapping, label-line parsing, and one source's images and boxes.

A KITTI label line has 15 whitespace-separated columns: class, truncation, occlusion,
alpha, the 2D box x1 y1 x2 y2 in pixels, then 3D dimensions, location and rotation
(unused here); an optional 16th column is a score (TAO's converter refuses it; inference
writes it).

As TAO's converter (which reads a label file with numpy's genfromtxt) a box column whose
values in one file are all integers gives integers, otherwise floats; image sizes are
those after EXIF orientation; images are taken in the order the folder lists them.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

from PIL import Image

from ..errors import UsageError, relative_to_cwd
from . import remote

# TAO's default class mapping (source class, lower-cased -> target class).
DEFAULT_MAPPING: dict[str, str] = {
    "person": "person", "person group": "person", "person_group": "person", "rider": "person",
    "backpack": "bag", "large_bag": "bag", "largebag": "bag", "personal_bag": "bag", "personalbag": "bag",
    "rolling_bag": "bag", "rollingbag": "bag",
    "face": "face",
}

KITTI_COLUMNS = (15, 16)


# The categories TAO writes with its default mapping (PeopleNet's classes), supercategory first.
DEFAULT_CATEGORIES = [{"supercategory": "person", "id": 1, "name": "person"},
                      {"supercategory": "face", "id": 2, "name": "face"},
                      {"supercategory": "bag", "id": 3, "name": "bag"}]


def category_ids_for(target_names: Iterable[str]) -> dict[str, int]:
    """Ids 1..N over the target names in reverse alphabetical order, as TAO assigns them."""
    return {name: k + 1 for k, name in enumerate(sorted(set(target_names), reverse=True))}


def categories_for(mapping_path: Optional[str], category_ids: dict[str, int]) -> list[dict]:
    """The `categories` TAO writes: its fixed list (with supercategory) for the default mapping,
    {id, name} in id order for a mapping file."""
    if not mapping_path:
        return [dict(c) for c in DEFAULT_CATEGORIES]
    return [{"id": cid, "name": name} for name, cid in sorted(category_ids.items(), key=lambda kv: kv[1])]


def read_mapping(path: Optional[str]) -> dict[str, str]:
    """Source class (lower-cased) -> target class, from `convert.mapping_path` or TAO's default.

    Accepted JSON: {target: [source, ...]} or TAO's flat {source: target}.
    """
    if not path:
        return dict(DEFAULT_MAPPING)
    try:
        with remote.open_file(path, "r", encoding="utf-8") as fh:
            raw = json.load(fh)
    except (FileNotFoundError, remote.ArtifactNotFound):
        raise UsageError(f"convert.mapping_path: file not found: {path}" + relative_to_cwd(path)) from None
    except IsADirectoryError:
        raise UsageError(f"convert.mapping_path: {path} is a folder, expected a file (JSON)") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"{path}: expected a JSON object {{target class: [source classes]}}")
    mapping: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            pairs = [(key, value)]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            pairs = [(source, key) for source in value]
        else:
            raise UsageError(f"{path}: entry {key!r}: expected a list of source class names (or one target name)")
        for source, target in pairs:
            known = mapping.get(source.lower())
            if known is not None and known != target:
                raise UsageError(f"{path}: source class {source!r} maps to both {known!r} and {target!r}")
            mapping[source.lower()] = target
    return mapping


@dataclass
class KittiImage:
    file_name: str               # relative to the source's image folder
    height: int
    width: int
    boxes: list[tuple[str, float, float, float, float]]  # (target class, x1, y1, x2, y2)


@dataclass
class KittiSource:
    name: str
    folder: str
    images: list[KittiImage] = field(default_factory=list)
    unmapped: Counter = field(default_factory=Counter)   # source class -> boxes skipped
    invalid_boxes: int = 0                               # non-positive width or height


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def parse_label_file(path: str, mapping: dict[str, str], source: KittiSource) -> list[tuple]:
    """The mapped boxes of one label file; unmapped classes and empty boxes are counted on `source`."""
    rows = []
    with remote.open_file(path, "r", encoding="utf-8", errors="replace") as fh:
        for line_number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            columns = line.split()
            if len(columns) not in KITTI_COLUMNS:
                raise UsageError(f"{path}:{line_number}: a KITTI label line has 15 columns (16 with a score), "
                                 f"got {len(columns)}")
            try:
                [float(v) for v in columns[4:8]]
            except ValueError:
                raise UsageError(f"{path}:{line_number}: columns 5-8 must be the box x1 y1 x2 y2 in pixels, "
                                 f"got {' '.join(columns[4:8])}") from None
            rows.append(columns)
    # As genfromtxt: a column of integers only reads as integers, any other as floats.
    integer = [all(_is_int(row[k]) for row in rows) for k in range(4, 8)]
    boxes = []
    for columns in rows:
        name = columns[0].lower()
        # Class names with spaces ("Person Group") are written with one; accept an underscore too.
        target = mapping.get(name) or mapping.get(name.replace("_", " "))
        if target is None:
            source.unmapped[name] += 1
            continue
        x1, y1, x2, y2 = (int(v) if is_int else float(v) for v, is_int in zip(columns[4:8], integer))
        if x2 <= x1 or y2 <= y1:
            source.invalid_boxes += 1
            continue
        boxes.append((target, x1, y1, x2, y2))
    return boxes


# EXIF orientations that turn the picture a quarter: width and height swap.
_QUARTER_TURNS = {5, 6, 7, 8}


def image_size(path: str) -> tuple[int, int]:
    """(height, width) after EXIF orientation (as TAO's converter and data loaders see the image),
    from the header, without decoding the pixels."""
    try:
        with Image.open(remote.local_copy(path)) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112)
    except (OSError, Image.DecompressionBombError) as err:
        raise UsageError(f"{path}: cannot read image ({err})") from None
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    return height, width


def list_source_images(folder: str, image_dir_name: str, image_extension: str) -> list[str]:
    image_dir = os.path.join(folder, image_dir_name)
    if not remote.is_dir(folder):
        raise UsageError(f"convert.input_source: data-source folder not found: {folder}")
    if not remote.is_dir(image_dir):
        raise UsageError(f"convert.image_dir_name: no folder {image_dir}")
    ext = image_extension if image_extension.startswith(".") else f".{image_extension}"
    # The folder's own order, as TAO takes it: the seeded shuffles then give TAO's partitions and shards.
    names = [name for name in remote.files_in(image_dir) if name.endswith(ext)]  # S3: in key order
    if not names:
        raise UsageError(f"convert.image_extension: no {ext} image in {image_dir}")
    return names


def label_path_for(folder: str, label_dir_name: str, image_name: str) -> str:
    return os.path.join(folder, label_dir_name, os.path.splitext(image_name)[0] + ".txt")


def read_image_entry(folder: str, image_dir_name: str, label_dir_name: str, image_name: str,
                     mapping: dict[str, str], source: KittiSource) -> KittiImage:
    label_path = label_path_for(folder, label_dir_name, image_name)
    if not remote.is_file(label_path):
        raise UsageError(f"{os.path.join(folder, image_dir_name, image_name)}: no label file {label_path}")
    boxes = parse_label_file(label_path, mapping, source)
    height, width = image_size(os.path.join(folder, image_dir_name, image_name))
    return KittiImage(image_name, height, width, boxes)
