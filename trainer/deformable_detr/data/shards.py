"""Splitting a converted source into partitions (folds) and shards of COCO JSON, as TAO names them."""
from __future__ import annotations

import numpy as np

from .kitti import KittiSource

PARTITION_SEED = 42  # partitions split images at random, the same way every run


def shard_file_name(source: str, partition: int, num_partitions: int, shard: int, num_shards: int) -> str:
    """`{source}-fold-{p}-of-{P}-shard-{s:05d}-of-{S:05d}.json`; the fold part only with several partitions."""
    fold = f"-fold-{partition}-of-{num_partitions}" if num_partitions > 1 else ""
    return f"{source}{fold}-shard-{shard:05d}-of-{num_shards:05d}.json"


def split_indices(count: int, num_partitions: int, num_shards: int,
                  seed: int = PARTITION_SEED) -> list[list[np.ndarray]]:
    """[partition][shard] -> image indices. Partitions are a seeded random split; within each, shards
    are consecutive runs whose sizes differ by at most one image."""
    if num_partitions > 1:
        order = np.random.default_rng(seed).permutation(count)
        partitions = [np.sort(part) for part in np.array_split(order, num_partitions)]
    else:
        partitions = [np.arange(count)]
    return [np.array_split(part, num_shards) for part in partitions]


def shard_coco(source: KittiSource, indices: np.ndarray, category_ids: dict[str, int]) -> dict:
    """A COCO dict for the images at `indices` (image id = index + 1, so ids are unique in the source)."""
    images, annotations = [], []
    for index in indices.tolist():
        entry = source.images[index]
        images.append({"id": index + 1, "file_name": entry.file_name, "height": entry.height, "width": entry.width})
        for name, x1, y1, x2, y2 in entry.boxes:
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": category_ids[name], "bbox": [x1, y1, w, h],
                                "area": w * h, "iscrowd": 0})
    categories = [{"id": cid, "name": name} for name, cid in sorted(category_ids.items(), key=lambda kv: kv[1])]
    return {"images": images, "annotations": annotations, "categories": categories}
