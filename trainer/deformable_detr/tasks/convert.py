"""The convert task: KITTI label folders -> sharded COCO JSON, per data source (TAO's layout).

For each folder listed in `convert.input_source` it writes
`{results_dir}/{source}/{source}[-fold-{p}-of-{P}]-shard-{s:05d}-of-{S:05d}.json`
and a summary of images, boxes and classes per shard to stdout and `stats.txt`.
Each shard lists images by file name relative to `{source}/{image_dir_name}`: use
that folder as `image_dir` and a glob of the shards as `json_file`.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from ..config.schema import ConvertConfig, ExperimentConfig
from ..errors import UsageError, relative_to_cwd
from ..runtime.logging import get_logger
from ..runtime.paths import task_results_dir
from ..runtime.progress import progress
from ..runtime.storage import write_text
from ..data.kitti import KittiSource, category_ids_for, list_source_images, read_image_entry, read_mapping
from ..data.shards import shard_coco, shard_file_name, split_indices

log = get_logger("convert")


def read_input_source(path: str | None) -> list[str]:
    """Folders listed one a line; relative lines are relative to the .txt file's folder."""
    if not path:
        raise UsageError("convert.input_source: not set; expected a .txt file listing KITTI data-source folders")
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except FileNotFoundError:
        raise UsageError(f"convert.input_source: file not found: {path}" + relative_to_cwd(path)) from None
    except IsADirectoryError:
        raise UsageError(f"convert.input_source: {path} is a folder, expected a file (.txt listing "
                         "KITTI data-source folders)") from None
    base = os.path.dirname(os.path.abspath(path))
    folders = []
    for line_number, line in enumerate(lines, start=1):
        if not line or line.startswith("#"):
            continue
        folder = line if os.path.isabs(line) else os.path.join(base, line)
        if not os.path.isdir(folder):
            raise UsageError(f"{path}:{line_number}: data-source folder not found: {folder}")
        folders.append(os.path.normpath(folder))
    if not folders:
        raise UsageError(f"convert.input_source: {path} lists no folder")
    names = [os.path.basename(f) for f in folders]
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise UsageError(f"{path}: several data sources are named {duplicates[0]!r}; output folders are named "
                         "after the source folder, so names must differ")
    return folders


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


def run(spec: ExperimentConfig) -> int:
    config = spec.convert
    out_dir = task_results_dir(spec, "convert")
    folders = read_input_source(config.input_source)
    mapping = read_mapping(config.mapping_path)
    category_ids = category_ids_for(mapping.values())
    class_names = sorted(category_ids, key=category_ids.get)
    rows: list[dict] = []
    notes: list[str] = []
    for folder in folders:
        source = read_source(folder, config, mapping)
        parts = split_indices(len(source.images), config.num_partitions, config.num_shards)
        for p, shards in enumerate(parts):
            for s, indices in enumerate(shards):
                name = shard_file_name(source.name, p, config.num_partitions, s, config.num_shards)
                coco = shard_coco(source, indices, category_ids)
                write_text(f"{out_dir.rstrip('/')}/{source.name}/{name}", json.dumps(coco))
                counts = Counter(name_ for i in indices.tolist() for name_, *_ in source.images[i].boxes)
                rows.append({"shard": f"{source.name}/{name}", "images": len(indices),
                             "boxes": len(coco["annotations"]), "classes": counts})
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
    write_text(f"{out_dir.rstrip('/')}/stats.txt", text)
    print(text, end="")
    print(f"wrote {len(rows)} shard(s) and stats.txt under {out_dir}")
    return 0
