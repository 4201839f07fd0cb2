"""The convert task: KITTI label folders -> sharded COCO JSON, per data source, as TAO's converter writes it.

For each folder listed in `convert.input_source` (lines relative to `convert.data_root`, or
without it to the .txt file's folder) it writes
`{results_dir}/{source}/{source}[-fold-{p:03d}-of-{P:03d}]-shard-{s:05d}-of-{S:05d}.json`
(data/shards.py: TAO's partitions, seeded shuffles and filled last shard). Image and
annotation ids count from 0 across sources, partitions and shards, and on from the counters
an earlier run left in `{results_dir}/stats.txt` (one `source,next image id,next annotation
id` line per source, TAO's format). `file_name` is `{source}/{image_dir_name}/{file}`,
relative to the data root: use that folder as `image_dir` and a glob of the shards as
`json_file`. A summary of images, boxes and classes per shard goes to stdout.
"""
from __future__ import annotations

import json
import math
import os
import random
from collections import Counter

from ..config.schema import ConvertConfig, ExperimentConfig
from ..errors import UsageError, relative_to_cwd
from ..runtime.logging import get_logger
from ..runtime.paths import task_results_dir
from ..runtime.progress import progress
from ..runtime.storage import write_text
from ..data.kitti import (KittiSource, categories_for, category_ids_for, list_source_images, read_image_entry,
                          read_mapping)
from ..data import remote
from ..data.shards import PARTITION_SEED, partition_frames, shard_file_name, shard_partitions
from ..runtime import storage
from .results_folder import record_effective_spec

log = get_logger("convert")


STATS_FILE = "stats.txt"


def read_input_source(path: str | None, data_root: str | None = None) -> list[str]:
    """Folders listed one a line; relative lines are relative to `data_root` (TAO's), else to the
    .txt file's folder."""
    if not path:
        raise UsageError("convert.input_source: not set; expected a .txt file listing KITTI data-source folders")
    try:
        with remote.open_file(path, "r", encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except (FileNotFoundError, remote.ArtifactNotFound):
        raise UsageError(f"convert.input_source: file not found: {path}" + relative_to_cwd(path)) from None
    except IsADirectoryError:
        raise UsageError(f"convert.input_source: {path} is a folder, expected a file (.txt listing "
                         "KITTI data-source folders)") from None
    base = data_root if data_root else _folder_of(path)
    if data_root and not remote.is_dir(data_root):
        raise UsageError(f"convert.data_root: folder not found: {data_root}" + relative_to_cwd(data_root))
    folders = []
    for line_number, line in enumerate(lines, start=1):
        if not line or line.startswith("#"):
            continue
        folder = line if os.path.isabs(line) or remote.is_s3(line) else os.path.join(base, line)
        if not remote.is_dir(folder):
            raise UsageError(f"{path}:{line_number}: data-source folder not found: {folder}")
        folders.append(folder.rstrip("/") if remote.is_s3(folder) else os.path.normpath(folder))
    if not folders:
        raise UsageError(f"convert.input_source: {path} lists no folder")
    names = [os.path.basename(f) for f in folders]
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise UsageError(f"{path}: several data sources are named {duplicates[0]!r}; output folders are named "
                         "after the source folder, so names must differ")
    return folders


def _folder_of(path: str) -> str:
    """The folder holding a local file or an S3 object."""
    return path.rsplit("/", 1)[0] if remote.is_s3(path) else os.path.dirname(os.path.abspath(path))


def read_source(folder: str, config: ConvertConfig, mapping: dict[str, str]) -> KittiSource:
    source = KittiSource(name=os.path.basename(folder), folder=folder)
    names = list_source_images(folder, config.image_dir_name, config.image_extension)
    for name in progress(names, desc=f"reading {source.name}"):
        source.images.append(read_image_entry(folder, config.image_dir_name, config.label_dir_name, name,
                                               mapping, source))
    return source


def stats_table(rows: list[dict], class_names: list[str]) -> str:
    headers = ["shard", "images", "boxes", *class_names]
    table = [[r["shard"], str(r["images"]), str(r["boxes"]), *(str(r["classes"].get(c, 0)) for c in class_names)]
             for r in rows]
    widths = [max(len(h), *(len(row[k]) for row in table)) if table else len(h) for k, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def read_counters(out_dir: str) -> tuple[int, int]:
    """(next image id, next annotation id): the last line of an earlier run's stats.txt, else (0, 0)."""
    path = f"{out_dir.rstrip('/')}/{STATS_FILE}"
    if not storage.exists(path):
        return 0, 0
    lines = [line for line in storage.read_bytes(path).decode("utf-8").splitlines() if line.strip()]
    try:
        _name, image_id, ann_id = lines[-1].rsplit(",", 2)
        return int(image_id), int(ann_id)
    except (IndexError, ValueError):
        raise UsageError(f"{path}: expected lines `source,next image id,next annotation id` (TAO's counters), "
                         f"got {lines[-1] if lines else 'an empty file'!r}; remove it to number from 0") from None


def check_fillable(source: str, partitions: list[list], num_shards: int) -> None:
    """TAO fills a short last shard with a sample of its partition, which cannot be larger than the
    partition: it crashes there; this says which field to change."""
    shards = max(num_shards, 1)
    for fold, part in enumerate(partitions):
        if part and shards * math.ceil(len(part) / shards) - len(part) > len(part):
            raise UsageError(f"convert.num_shards: {num_shards} shards of the {len(part)} image(s) of {source}'s "
                             f"partition {fold} would repeat more images than it has to fill the last shards; "
                             f"accepted: at most {len(part)} for this source")


def shard_coco(source: KittiSource, indices: list[int], categories: list[dict], category_ids: dict[str, int],
               image_dir_name: str, first_image_id: int, first_ann_id: int) -> dict:
    """TAO's COCO dict of one shard: ids from `first_image_id` / `first_ann_id` on, one image entry (and
    id) per listed index, repeats included."""
    images, annotations = [], []
    for offset, index in enumerate(indices):
        entry = source.images[index]
        image_id = first_image_id + offset
        images.append({"id": image_id, "file_name": f"{source.name}/{image_dir_name}/{entry.file_name}",
                       "height": entry.height, "width": entry.width})
        for name, x1, y1, x2, y2 in entry.boxes:
            bbox = [x1, y1, x2 - x1, y2 - y1]
            annotations.append({"image_id": image_id, "category_id": category_ids[name],
                                "id": first_ann_id + len(annotations), "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": categories}


def run(spec: ExperimentConfig) -> int:
    config = spec.convert
    out_dir = task_results_dir(spec, "convert").rstrip("/")
    folders = read_input_source(config.input_source, config.data_root)
    mapping = read_mapping(config.mapping_path)
    category_ids = category_ids_for(mapping.values())
    categories = categories_for(config.mapping_path, category_ids)
    class_names = sorted(category_ids, key=category_ids.get)
    image_id, ann_id = read_counters(out_dir)
    stats_path = f"{out_dir}/{STATS_FILE}"
    stats = storage.read_bytes(stats_path).decode("utf-8") if storage.exists(stats_path) else ""
    rows: list[dict] = []
    notes: list[str] = []
    for sequence_index, folder in enumerate(folders):
        source = read_source(folder, config, mapping)
        rng = random.Random(PARTITION_SEED)  # TAO seeds Python's random with 42 for each source
        partitions = partition_frames(list(range(len(source.images))), config.num_partitions,
                                      config.partition_mode, config.val_split, rng, sequence_index)
        check_fillable(source.name, partitions, config.num_shards)
        sharded = shard_partitions(partitions, config.num_shards, rng,
                                   renumber=config.partition_mode != "sequence")
        for fold, shards in sharded:
            for s, indices in enumerate(shards):
                name = shard_file_name(source.name, fold, config.num_partitions, s, config.num_shards)
                coco = shard_coco(source, indices, categories, category_ids, config.image_dir_name, image_id, ann_id)
                write_text(f"{out_dir}/{source.name}/{name}", json.dumps(coco))
                image_id += len(coco["images"])
                ann_id += len(coco["annotations"])
                counts = Counter(name_ for i in indices for name_, *_ in source.images[i].boxes)
                rows.append({"shard": f"{source.name}/{name}", "images": len(indices),
                             "boxes": len(coco["annotations"]), "classes": counts})
        stats += f"{source.name},{image_id},{ann_id}\n"
        write_text(f"{out_dir}/{STATS_FILE}", stats)
        if source.unmapped:
            skipped = ", ".join(f"{n}: {c}" for n, c in sorted(source.unmapped.items()))
            notes.append(f"{source.name}: skipped boxes of unmapped classes ({skipped})")
        if source.invalid_boxes:
            notes.append(f"{source.name}: skipped {source.invalid_boxes} box(es) with non-positive width or height")
    total = {"shard": "total", "images": sum(r["images"] for r in rows), "boxes": sum(r["boxes"] for r in rows),
             "classes": sum((r["classes"] for r in rows), Counter())}
    ids = ", ".join(f"{name}={category_ids[name]}" for name in class_names)
    text = "\n".join([stats_table(rows + [total], class_names), "", f"category ids: {ids}",
                      f"num_classes: {len(class_names) + 1}", *notes]) + "\n"
    print(text, end="")
    record_effective_spec(spec, "convert")  # after every shard: a stopped run leaves the earlier record
    print(f"wrote {len(rows)} shard(s) and {STATS_FILE} (next image id {image_id}, next annotation id {ann_id}) "
          f"under {out_dir}")
    return 0
