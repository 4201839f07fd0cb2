"""Set criterion: sigmoid focal loss, L1 and GIoU box losses on every decoder layer."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float,
                       alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (RetinaNet), averaged over queries and summed, per box (as the original)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def weight_dict_for(cls_coef: float, bbox_coef: float, giou_coef: float, dec_layers: int,
                    aux_loss: bool, two_stage: bool) -> Dict[str, float]:
    base = {"loss_ce": cls_coef, "loss_bbox": bbox_coef, "loss_giou": giou_coef}
    weights = dict(base)
    if aux_loss:
        for i in range(dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    if two_stage:
        weights.update({f"{k}_enc": v for k, v in base.items()})
    return weights


def _source_index(indices: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


class SetCriterion(nn.Module):
    """`criterion(outputs, targets)` -> weighted loss terms; their sum is the training loss.

    Classes are indexed 0..num_classes-1 by the classifier; a query matched to nothing has
    an all-zero one-hot target.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float],
                 losses: Sequence[str] = ("labels", "boxes"), focal_alpha: float = 0.25) -> None:
        super().__init__()
        unknown = set(losses) - {"labels", "boxes"}
        if unknown:
            raise ValueError(f"unknown loss types {sorted(unknown)}; accepted: labels, boxes")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = list(losses)
        self.focal_alpha = focal_alpha

    def loss_labels(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"]
        idx = _source_index(indices)
        matched_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_classes
        onehot = torch.zeros(logits.shape[0], logits.shape[1], logits.shape[2] + 1, dtype=logits.dtype,
                             device=logits.device)
        onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
        onehot = onehot[:, :, :-1]
        loss = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=2) * logits.shape[1]
        return {"loss_ce": loss}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        idx = _source_index(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], 0).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def _num_boxes(self, targets, device) -> float:
        """Boxes in the batch, averaged over ranks so that every rank normalises alike."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        return torch.clamp(num_boxes, min=1).item()

    def _losses_for(self, outputs, targets, num_boxes, suffix: str) -> Dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        terms: Dict[str, torch.Tensor] = {}
        for name in self.losses:
            terms.update(getattr(self, f"loss_{name}")(outputs, targets, indices, num_boxes))
        return {f"{k}{suffix}": v for k, v in terms.items()}

    def unweighted(self, outputs, targets: List[Dict[str, torch.Tensor]],
                   num_boxes: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """Every loss term before weighting (for logging); `num_boxes`: the normaliser when the
        batch is one of several micro-batches of a step (else this batch's boxes per rank)."""
        final = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
        if num_boxes is None:
            num_boxes = self._num_boxes(targets, final["pred_logits"].device)
        losses = self._losses_for(final, targets, num_boxes, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses_for(aux, targets, num_boxes, f"_{i}"))
        if "enc_outputs" in outputs:
            # Encoder proposals are scored class-agnostically: every target is class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses_for(outputs["enc_outputs"], binary, num_boxes, "_enc"))
        return losses

    def forward(self, outputs, targets: List[Dict[str, torch.Tensor]],
                num_boxes: Optional[float] = None) -> Dict[str, torch.Tensor]:
        losses = self.unweighted(outputs, targets, num_boxes)
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}
