"""`deformable-detr default-spec`: the whole schema as a commented YAML file."""
from __future__ import annotations

import dataclasses

import yaml

from ..tasks import TASKS
from .schema import ExperimentConfig


_EXAMPLES = {
    "train_data_sources": ["- image_dir: /data/train/images", "  json_file: /data/train/annotations.json"],
    "val_data_sources": ["- image_dir: /data/val/images", "  json_file: /data/val/annotations.json"],
    "test_data_sources": ["image_dir: /data/val/images", "json_file: /data/val/annotations.json"],
    "infer_data_sources": ["image_dir: [/data/infer/images]", "classmap: /data/classmap.txt"],
    "color_map": ["person: green", "car: '#ff0000'"],
}


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _comment(f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = [meta.get("help", "")]
    if "choices" in meta:
        parts.append("one of: " + ", ".join(map(str, meta["choices"])))
    elif "min" in meta or "max" in meta:
        lo, hi = meta.get("min"), meta.get("max")
        parts.append(f"range: {'' if lo is None else lo}..{'' if hi is None else hi}")
    if "aliases" in meta:
        parts.append("also spelled: " + ", ".join(meta["aliases"]))
    return "; ".join(p for p in parts if p)


def _emit(obj, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        comment = _comment(f)
        if comment:
            lines.append(f"{pad}# {comment}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _emit(value, indent + 1, lines)
            continue
        if f.name in _EXAMPLES:
            lines.append(f"{pad}# for example:")
            lines.append(f"{pad}# {f.name}:")
            lines.extend(f"{pad}#   {line}" for line in _EXAMPLES[f.name])
        lines.append(f"{pad}{f.name}: {_scalar(value)}")


def default_spec_text(task: str | None = None) -> str:
    spec = ExperimentConfig()
    wanted = TASKS[task].sections if task in TASKS else None
    lines = [f"# Deformable DETR experiment spec{' for ' + task if task else ''}: every field with its default.",
             "# Override any field on the command line: section.field=value", ""]
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            if wanted is not None and f.name not in wanted:
                continue
            lines.append(f"# {_comment(f)}")
            lines.append(f"{f.name}:")
            _emit(value, 1, lines)
            lines.append("")
        else:
            lines.append(f"# {_comment(f)}")
            lines.append(f"{f.name}: {_scalar(value)}")
    return "\n".join(lines).rstrip() + "\n"


