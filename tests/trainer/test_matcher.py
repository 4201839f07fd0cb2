"""Hungarian matcher: recovers planted assignments and the brute-force optimum."""
from __future__ import annotations

import itertools

import torch

from deformable_detr.model.box_ops import cxcywh_to_xyxy, generalized_box_iou
from deformable_detr.model.matcher import HungarianMatcher


def test_recovers_planted_assignment():
    torch.manual_seed(0)
    num_queries, num_classes = 10, 5
    targets = [{"labels": torch.tensor([1, 4, 2]), "boxes": torch.tensor(
        [[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]])},
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.4, 0.3, 0.2, 0.2]])}]
    planted = [torch.tensor([7, 2, 5]), torch.tensor([0])]
    logits = torch.full((2, num_queries, num_classes), -6.0)
    boxes = torch.rand(2, num_queries, 4) * 0.2 + 0.4
    for b, (target, queries) in enumerate(zip(targets, planted)):
        logits[b, queries, target["labels"]] = 6.0
        boxes[b, queries] = target["boxes"]
    indices = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for (query_idx, target_idx), queries in zip(indices, planted):
        assert query_idx.dtype == torch.int64
        assert dict(zip(target_idx.tolist(), query_idx.tolist())) == dict(enumerate(queries.tolist()))


def _focal_cost(prob: torch.Tensor, alpha=0.25, gamma=2.0) -> torch.Tensor:
    positive = alpha * (1 - prob) ** gamma * -torch.log(prob + 1e-8)
    negative = (1 - alpha) * prob ** gamma * -torch.log(1 - prob + 1e-8)
    return positive - negative


def test_equals_brute_force_optimum():
    torch.manual_seed(1)
    logits, boxes = torch.randn(1, 5, 3), torch.rand(1, 5, 4) * 0.5 + 0.25
    target = {"labels": torch.tensor([0, 2, 1]), "boxes": torch.rand(3, 4) * 0.5 + 0.25}
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    query_idx, target_idx = matcher({"pred_logits": logits, "pred_boxes": boxes}, [target])[0]

    prob = logits[0].sigmoid()
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes[0]), cxcywh_to_xyxy(target["boxes"]))

    def cost(q: int, t: int) -> float:
        l1 = (boxes[0, q] - target["boxes"][t]).abs().sum()
        return float(2 * _focal_cost(prob[q, target["labels"][t]]) + 5 * l1 - 2 * giou[q, t])

    best = min(sum(cost(q, t) for t, q in enumerate(queries)) for queries in itertools.permutations(range(5), 3))
    found = sum(cost(q, t) for q, t in zip(query_idx.tolist(), target_idx.tolist()))
    assert abs(found - best) < 1e-5


def test_images_without_boxes():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    for targets in ([empty, empty], [empty, one]):
        indices = HungarianMatcher()(outputs, targets)
        assert [len(i) for i, _ in indices] == [len(t["labels"]) for t in targets]
