"""Post-processing: top-k (query, class) pairs by sigmoid score, boxes in absolute xyxy."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from .box_ops import cxcywh_to_xyxy


class PostProcess(nn.Module):
    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], target_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """target_sizes [B, 2] as (h, w) of each original image."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"{len(logits)} predictions but {len(target_sizes)} target sizes")
        batch, _, num_classes = logits.shape
        prob = logits.float().sigmoid().view(batch, -1)
        k = min(self.num_select, prob.shape[1])
        scores, flat_index = torch.topk(prob, k, dim=1)
        query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
        labels = flat_index % num_classes
        xyxy = torch.gather(cxcywh_to_xyxy(boxes.float()), 1, query_index.unsqueeze(-1).repeat(1, 1, 4))
        height, width = target_sizes.to(xyxy).unbind(1)
        scale = torch.stack([width, height, width, height], 1)
        xyxy = xyxy * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]
