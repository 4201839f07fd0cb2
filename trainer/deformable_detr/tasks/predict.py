"""The evaluation path: a model's detections over a data loader, per image or as COCO results.

Evaluate, inference and training's validation all predict through `predict_batches`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch

from ..runtime.progress import progress


def _target_sizes(targets: list[dict]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(t["orig_size"], dtype=torch.int64) for t in targets])


def predict_batches(model, postprocessor, dataloader: Iterable, device: torch.device | str,
                    desc: str = "predict", show_progress: bool = True, total: Optional[int] = None,
                    on_outputs: Optional[Callable[[dict, list[dict]], None]] = None) -> Iterator[tuple[dict, dict]]:
    """(target, detections) per image: detections {scores, labels, boxes} in original-image xyxy pixels.

    `on_outputs(outputs, targets)` sees each batch's raw model outputs first (validation's loss).
    """
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)
    with torch.inference_mode():
        for images, masks, targets in progress(dataloader, total=total, desc=desc, enabled=show_progress):
            outputs = model(images.to(device, non_blocking=True), masks.to(device, non_blocking=True))
            if on_outputs is not None:
                on_outputs(outputs, targets)
            detections = postprocessor(outputs, _target_sizes(targets).to(device))
            for target, found in zip(targets, detections):
                yield target, {name: value.detach().cpu() for name, value in found.items()}


def to_coco_results(image_id: int, detections: dict, conf_threshold: float = 0.0) -> list[dict]:
    """COCO results (bbox x, y, w, h) of one image, dropping scores below `conf_threshold`."""
    keep = detections["scores"] >= conf_threshold
    results = []
    for score, label, box in zip(detections["scores"][keep].tolist(), detections["labels"][keep].tolist(),
                                 detections["boxes"][keep].tolist()):
        x1, y1, x2, y2 = box
        results.append({"image_id": int(image_id), "category_id": int(label),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return results


def predict(model, postprocessor, dataloader: Iterable, device: torch.device | str, conf_threshold: float = 0.0,
            show_progress: bool = True, desc: str = "predict", total: Optional[int] = None,
            on_outputs: Optional[Callable[[dict, list[dict]], None]] = None) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox xywh, score) for every image of `dataloader`."""
    results: list[dict] = []
    for target, detections in predict_batches(model, postprocessor, dataloader, device, desc, show_progress,
                                              total, on_outputs):
        results.extend(to_coco_results(int(torch.as_tensor(target["image_id"]).item()), detections, conf_threshold))
    return results
