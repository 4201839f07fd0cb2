"""Data: COCO datasets, TAO augmentation, samplers, loaders, inference images, KITTI convert.

Names are imported on first use (PEP 562) so that torch-free parts (`kitti`, `shards`,
`example`, used by `convert` and `make-example-data`) start without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "collate_fn": "collate", "CocoDetection": "dataset", "build_dataset": "dataset",
    "UnreadableImageError": "images", "InferenceImages": "inference", "read_classmap": "inference",
    "build_dataloader": "loader", "build_eval_transform": "transforms", "build_train_transform": "transforms",
    "fixed_pad_size": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
