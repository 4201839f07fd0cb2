"""Batches as the training step and validation take them: on the device, outputs in float32,
and validation's batch counts padded to be equal on every rank."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


def float_outputs(value: Any) -> Any:
    """Model outputs in float32, so that matching and losses run at full precision under autocast."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: float_outputs(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(float_outputs(v) for v in value)
    return value


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets]


def padded_batches(loader: Iterable, count: int) -> Iterator[Any]:
    """`loader`'s batches, then copies of its last one (image_id -1, results dropped) up to `count`."""
    last = None
    seen = 0
    for batch in loader:
        last = batch
        seen += 1
        yield batch
    if seen >= count:
        return
    if last is None:  # this rank got no image at all: pad with the dataset's first image
        dataset = loader.dataset  # type: ignore[attr-defined]
        last = loader.collate_fn([dataset[0]])  # type: ignore[attr-defined]
    images, masks, targets = last
    padding = [{**t, "image_id": torch.tensor(-1)} for t in targets]
    for _ in range(count - seen):
        yield images, masks, padding
