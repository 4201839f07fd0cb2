"""Box helpers shared by the detector, matcher, criterion and post-processor."""
from __future__ import annotations

import torch
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["cxcywh_to_xyxy", "generalized_box_iou", "inverse_sigmoid"]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x), clamped so that 0 and 1 stay finite (as the original does)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
