"""Held-out tests of COCO scoring: ground truth and detections written by hand, where the right AP is known."""
from __future__ import annotations

import json
import random

import pytest

from deformable_detr.data.coco_eval import STAT_NAMES, evaluate_coco
from deformable_detr.errors import UsageError

# pycocotools interpolates precision at 101 recall points (0.00, 0.01, ..., 1.00).
HALF_RECALL_AP = 51 / 101


def _ground_truth(boxes_by_image: dict[int, list[tuple[int, list[float]]]], names=("car", "person")) -> dict:
    """COCO dict from {image_id: [(category_id, [x, y, w, h]), ...]} on 640x480 images."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in sorted(boxes_by_image)]
    annotations = []
    for image_id, boxes in sorted(boxes_by_image.items()):
        for category_id, box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": list(box), "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _exact_detections(gt: dict, score: float = 0.9) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
            for a in gt["annotations"]]


# Two images, two classes, boxes large enough (> 96^2) to be "large" in COCO's area ranges.
GT = _ground_truth({
    1: [(1, [10, 10, 120, 100]), (2, [300, 50, 110, 200])],
    2: [(1, [50, 200, 150, 120]), (2, [400, 100, 100, 150])],
})


def test_every_box_found_exactly_scores_one():
    metrics = evaluate_coco(GT, _exact_detections(GT))
    for name in ("AP", "AP50", "AP75", "APl", "AR1", "AR10", "AR100", "ARl"):
        assert metrics[name] == pytest.approx(1.0), name
    # No small or medium objects: pycocotools reports -1 ("nothing to score").
    assert metrics["APs"] == -1.0 and metrics["APm"] == -1.0
    assert metrics["per_class"] == {"car": pytest.approx(1.0), "person": pytest.approx(1.0)}


def test_half_of_the_boxes_found():
    found = [d for d in _exact_detections(GT) if d["image_id"] == 1]
    metrics = evaluate_coco(GT, found)
    assert metrics["AP"] == pytest.approx(HALF_RECALL_AP)
    assert metrics["AP50"] == pytest.approx(HALF_RECALL_AP)
    assert metrics["AR100"] == pytest.approx(0.5)
    assert metrics["per_class"]["car"] == pytest.approx(HALF_RECALL_AP)


def test_one_class_missing():
    cars_only = [d for d in _exact_detections(GT) if d["category_id"] == 1]
    metrics = evaluate_coco(GT, cars_only)
    assert metrics["per_class"] == {"car": pytest.approx(1.0), "person": 0.0}
    assert metrics["AP"] == pytest.approx(0.5)
    assert metrics["AR100"] == pytest.approx(0.5)


def test_class_ids_restrict_scoring_to_those_classes():
    cars_only = [d for d in _exact_detections(GT) if d["category_id"] == 1]
    metrics = evaluate_coco(GT, cars_only, class_ids=[1])
    assert metrics["AP"] == pytest.approx(1.0)
    assert list(metrics["per_class"]) == ["car"]


def test_false_positive_ranked_first_halves_precision():
    gt = _ground_truth({1: [(1, [10, 10, 200, 200])]})
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": [400, 300, 100, 100], "score": 0.9},  # nothing there
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 200, 200], "score": 0.8},
    ]
    metrics = evaluate_coco(gt, detections)
    # Recall 1 is reached at precision 1/2, and interpolated precision is 1/2 at every recall point.
    assert metrics["AP"] == pytest.approx(0.5)
    assert metrics["AR1"] == 0.0  # the single best-scoring detection is the false one
    assert metrics["AR100"] == pytest.approx(1.0)


def test_loose_box_passes_low_iou_thresholds_only():
    gt = _ground_truth({1: [(1, [0, 0, 100, 100])]})
    # Same left/top/width, 62% of the height: IoU 0.62 passes 0.50, 0.55, 0.60 of the ten thresholds.
    detections = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 62], "score": 0.7}]
    metrics = evaluate_coco(gt, detections)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.3)


def test_small_objects_score_in_the_small_range():
    gt = _ground_truth({1: [(1, [5, 5, 20, 20]), (2, [100, 100, 25, 25])]})
    metrics = evaluate_coco(gt, _exact_detections(gt))
    assert metrics["APs"] == pytest.approx(1.0)
    assert metrics["APm"] == -1.0 and metrics["APl"] == -1.0


def test_no_detections_scores_zero():
    metrics = evaluate_coco(GT, [])
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0
    assert metrics["per_class"] == {"car": 0.0, "person": 0.0}


def test_accepts_pycocotools_object_and_json_path(tmp_path):
    from pycocotools.coco import COCO

    path = tmp_path / "gt.json"
    path.write_text(json.dumps(GT))
    coco = COCO(str(path))
    detections = _exact_detections(GT)
    assert evaluate_coco(coco, detections)["AP"] == pytest.approx(1.0)
    assert evaluate_coco(str(path), detections)["AP"] == pytest.approx(1.0)
    assert len(coco.dataset["annotations"]) == 4  # the caller's ground truth is left untouched


def test_unknown_class_ids_are_a_usage_error():
    with pytest.raises(UsageError, match="dataset.eval_class_ids"):
        evaluate_coco(GT, _exact_detections(GT), class_ids=[7])


def test_detection_on_an_unknown_image_is_refused():
    bad = [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}]
    with pytest.raises(ValueError, match="image_id 99"):
        evaluate_coco(GT, bad)


def test_detections_of_classes_without_ground_truth_are_not_scored():
    stray = [{"image_id": 1, "category_id": 0, "bbox": [10, 10, 120, 100], "score": 0.99}]
    metrics = evaluate_coco(GT, _exact_detections(GT) + stray)
    assert metrics["AP"] == pytest.approx(1.0)
    assert list(metrics["per_class"]) == ["car", "person"]


def _random_case(seed: int, num_images: int = 40):
    """Ground truth and noisy detections (jittered, missed, spurious) across three classes and all sizes."""
    rng = random.Random(seed)
    boxes = {}
    for image_id in range(1, num_images + 1):
        boxes[image_id] = []
        for _ in range(rng.randint(0, 5)):
            w, h = rng.uniform(8, 250), rng.uniform(8, 250)
            boxes[image_id].append((rng.randint(1, 3), [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h]))
    gt = _ground_truth(boxes, names=("car", "person", "bicycle"))
    detections = []
    for ann in gt["annotations"]:
        if rng.random() < 0.8:
            x, y, w, h = ann["bbox"]
            jitter = [rng.gauss(0, 0.1 * w), rng.gauss(0, 0.1 * h), rng.gauss(0, 0.1 * w), rng.gauss(0, 0.1 * h)]
            detections.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                               "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                               "score": round(rng.random(), 4)})
    for image_id in boxes:
        for _ in range(rng.randint(0, 3)):
            detections.append({"image_id": image_id, "category_id": rng.randint(1, 3),
                               "bbox": [rng.uniform(0, 500), rng.uniform(0, 350), rng.uniform(5, 140),
                                        rng.uniform(5, 130)], "score": round(rng.random(), 4)})
    return gt, detections


def test_per_class_ap_averages_to_ap():
    gt, detections = _random_case(seed=3)
    metrics = evaluate_coco(gt, detections)
    scored = [ap for ap in metrics["per_class"].values() if ap >= 0]
    assert 0.0 < metrics["AP"] < 1.0
    assert sum(scored) / len(scored) == pytest.approx(metrics["AP"], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_coco_eval_gives_identical_numbers(seed):
    gt, detections = _random_case(seed)
    reference = evaluate_coco(gt, detections, backend="pycocotools")
    fast = evaluate_coco(gt, detections, backend="faster_coco_eval")
    # Same matching and interpolation; only the summation order differs, so the last bit may.
    for name in STAT_NAMES:
        assert fast[name] == pytest.approx(reference[name], rel=0, abs=1e-12), name
    assert fast["per_class"] == pytest.approx(reference["per_class"], rel=0, abs=1e-12)
    assert 0.0 < reference["AP"] < 1.0
