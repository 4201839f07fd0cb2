"""Annotation stores: the per-image records a dataset reads, in two layouts.

`SerializedAnnotations` keeps everything in a few flat numpy arrays. Data-loader
workers are forked from the main process; reading a numpy array never touches
per-object reference counts, so its pages stay shared with the parent instead of
being copied into every worker as Python objects are when they are merely read
(copy-on-access). `PythonAnnotations` keeps a list of dicts (the `default`
dataset_type, like the original COCO loader).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .coco_json import SourceColumns


@dataclass
class ImageRecord:
    image_id: int            # unique over all sources of the split
    path: str
    height: int
    width: int
    boxes_xywh: np.ndarray   # float32 [n, 4], pixels
    category_ids: np.ndarray  # int64 [n]


class AnnotationStore(Protocol):
    source_index: np.ndarray  # int64 [N]: which source each image came from

    def __len__(self) -> int: ...

    def record(self, index: int) -> ImageRecord: ...


def merged_image_ids(sources: Sequence[SourceColumns]) -> list[np.ndarray]:
    """Image ids per source: the JSON's own for one source, 1..N in order for several.

    Several sources may reuse the same ids, so they are renumbered; `coco_merge`
    applies the same numbering to the ground truth used for scoring.
    """
    if len(sources) == 1:
        return [sources[0].image_ids]
    out, start = [], 1
    for src in sources:
        out.append(np.arange(start, start + len(src.image_ids), dtype=np.int64))
        start += len(src.image_ids)
    return out


class SerializedAnnotations:
    """All records in flat arrays: ids, sizes, a byte buffer of paths, boxes by image."""

    def __init__(self, sources: Sequence[SourceColumns]) -> None:
        ids = merged_image_ids(sources)
        self.image_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.heights = np.concatenate([s.heights for s in sources])
        self.widths = np.concatenate([s.widths for s in sources])
        self.source_index = np.concatenate(
            [np.full(len(s.image_ids), k, np.int64) for k, s in enumerate(sources)])
        encoded = [os.fsencode(os.path.join(s.image_dir, name)) for s in sources for name in s.file_names]
        self.path_offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(p) for p in encoded], out=self.path_offsets[1:])
        self.path_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        del encoded
        # Boxes of all sources, sorted by global image index, with per-image offsets.
        image_start = np.cumsum([0] + [len(s.image_ids) for s in sources[:-1]])
        box_image = np.concatenate([s.box_image_index + start for s, start in zip(sources, image_start)])
        order = np.argsort(box_image, kind="stable")
        self.boxes_xywh = np.concatenate([s.boxes_xywh for s in sources])[order]
        self.category_ids = np.concatenate([s.category_ids for s in sources])[order]
        counts = np.bincount(box_image, minlength=len(self.image_ids))
        self.box_offsets = np.zeros(len(self.image_ids) + 1, np.int64)
        np.cumsum(counts, out=self.box_offsets[1:])

    def __len__(self) -> int:
        return len(self.image_ids)

    def record(self, index: int) -> ImageRecord:
        start, end = self.box_offsets[index], self.box_offsets[index + 1]
        path = os.fsdecode(self.path_bytes[self.path_offsets[index]:self.path_offsets[index + 1]].tobytes())
        return ImageRecord(int(self.image_ids[index]), path, int(self.heights[index]), int(self.widths[index]),
                           self.boxes_xywh[start:end].copy(), self.category_ids[start:end].copy())


class PythonAnnotations:
    """All records as Python dicts and lists (dataset_type: default)."""

    def __init__(self, sources: Sequence[SourceColumns]) -> None:
        self.records: list[dict] = []
        for src, ids in zip(sources, merged_image_ids(sources)):
            per_image: list[dict] = [
                {"image_id": int(image_id), "path": os.path.join(src.image_dir, name), "height": int(h),
                 "width": int(w), "boxes": [], "category_ids": []}
                for image_id, name, h, w in zip(ids, src.file_names, src.heights, src.widths)]
            for image_index, box, cat in zip(src.box_image_index.tolist(), src.boxes_xywh.tolist(),
                                              src.category_ids.tolist()):
                per_image[image_index]["boxes"].append(box)
                per_image[image_index]["category_ids"].append(cat)
            self.records.extend(per_image)
        self.source_index = np.concatenate(
            [np.full(len(s.image_ids), k, np.int64) for k, s in enumerate(sources)])

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> ImageRecord:
        r = self.records[index]
        return ImageRecord(r["image_id"], r["path"], r["height"], r["width"],
                           np.asarray(r["boxes"], np.float32).reshape(-1, 4),
                           np.asarray(r["category_ids"], np.int64).reshape(-1))


def build_store(sources: Sequence[SourceColumns], dataset_type: str) -> AnnotationStore:
    if dataset_type == "serialized":
        return SerializedAnnotations(sources)
    return PythonAnnotations(sources)
