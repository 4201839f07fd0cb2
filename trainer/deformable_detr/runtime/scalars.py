"""The scalars a training run reports as curves, named once: one feed for TensorBoard's event files
(runtime/tensorboard_log.py) and Weights & Biases (runtime/wandb_log.py), so both show the same curves.
Per step `train/<loss term>`, `train/loss`, `train/lr`, `train/epoch` and the step's throughput and data
wait; per validation `val/<COCO metric>` and `val/per_class_AP/<class>`."""
from __future__ import annotations

from typing import Any, Mapping


def step_scalars(losses: Mapping[str, float], lr: float, epoch: int, **extra: float) -> dict[str, float]:
    values = {f"train/{name}": float(value) for name, value in losses.items()}
    values.update({"train/loss": float(sum(losses.values())), "train/lr": float(lr), "train/epoch": float(epoch)})
    values.update({f"train/{name}": float(value) for name, value in extra.items()})
    return values


def validation_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    values = {}
    for name, value in metrics.items():
        if isinstance(value, dict):  # per_class_AP: {class name: AP}
            values.update({f"val/{name}/{key}": float(v) for key, v in value.items() if v is not None})
        elif value is not None:
            values[f"val/{name}"] = float(value)
    return values
