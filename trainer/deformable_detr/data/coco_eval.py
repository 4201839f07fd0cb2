"""COCO box metrics of detections against ground truth: pycocotools' numbers exactly.

`evaluate_coco` runs pycocotools' COCOeval (or, for speed, faster-coco-eval, whose
numbers the tests check agree to 1e-12: they sum in another order, so the last bit
may differ) and returns the twelve summary numbers plus
the AP of each class. A value of -1.0 is pycocotools' "nothing to score" (no ground
truth in that class or area range); it is kept as is so the numbers stay pycocotools'.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import UsageError

# pycocotools' `stats` order for bbox evaluation.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("pycocotools", "faster_coco_eval")


def _gt_dataset(coco_gt) -> dict:
    """The ground-truth COCO dict from a pycocotools COCO object, a dict or a JSON path."""
    if isinstance(coco_gt, dict):
        return coco_gt
    if isinstance(coco_gt, str):
        with open(coco_gt, encoding="utf-8") as fh:
            return json.load(fh)
    return coco_gt.dataset


def _check_results(results: Sequence[dict], image_ids: set) -> None:
    # pycocotools asserts this without saying which id; a category the ground truth lacks
    # (e.g. the background id 0 of an untrained model) is simply not scored, as in pycocotools.
    for det in results:
        if det["image_id"] not in image_ids:
            raise ValueError(f"detection for image_id {det['image_id']}, which the ground truth does not have")


def _evaluator(backend: str, gt: dict, results: list[dict]):
    """A COCOeval of `backend` over `gt` and `results` (copied: both libraries mutate their input)."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        evaluator_class = COCOeval
    else:
        from faster_coco_eval import COCO, COCOeval_faster
        evaluator_class = COCOeval_faster
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    coco_gt.createIndex()
    if results:
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
    else:
        # loadRes refuses an empty list; an empty result set scores 0 wherever there is ground truth.
        coco_dt = COCO()
        coco_dt.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                           "annotations": []}
        coco_dt.createIndex()
    return evaluator_class(coco_gt, coco_dt, "bbox")


def _class_ap(precision: np.ndarray, index: int) -> float:
    """AP of one category over IoU 0.50:0.95, all areas, 100 detections (as pycocotools averages)."""
    values = precision[:, :, index, 0, -1]
    values = values[values > -1]
    return float(np.mean(values)) if values.size else -1.0


def evaluate_coco(coco_gt, results: Iterable[dict], class_ids: Optional[Sequence[int]] = None,
                  backend: str = "pycocotools") -> dict:
    """COCO bbox metrics of `results` (COCO results: image_id, category_id, bbox xywh, score).

    `coco_gt`: a pycocotools COCO object, a COCO dict or a JSON path. `class_ids`: the
    category ids to score (all of the ground truth's when None). Returns {AP, AP50, AP75,
    APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl, per_class: {class name: AP}}.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    gt = _gt_dataset(coco_gt)
    names = {int(cat["id"]): str(cat.get("name", cat["id"])) for cat in gt.get("categories", [])}
    if class_ids is not None:
        unknown = sorted(set(class_ids) - set(names))
        if unknown:
            raise UsageError(f"dataset.eval_class_ids: {unknown} are not category ids of the ground truth; "
                             f"accepted: {sorted(names)}")
        if not class_ids:
            raise UsageError("dataset.eval_class_ids: empty; list category ids, or null for all")
    results = list(results)
    _check_results(results, {int(img["id"]) for img in gt.get("images", [])})
    if class_ids is not None:
        results = [det for det in results if det["category_id"] in set(class_ids)]

    # Both libraries print their progress and summary table; the caller prints its own.
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = _evaluator(backend, gt, results)
        if class_ids is not None:
            evaluator.params.catIds = sorted(set(int(i) for i in class_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics: dict = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    precision = evaluator.eval["precision"]
    metrics["per_class"] = {names[cat_id]: _class_ap(precision, k)
                            for k, cat_id in enumerate(evaluator.params.catIds)}
    return metrics
