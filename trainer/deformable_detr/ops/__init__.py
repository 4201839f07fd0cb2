"""Multi-scale deformable attention behind one function.

`multi_scale_deformable_attention` is what the model calls. Which implementation runs
(the PyTorch reference, or a compiled CPU/CUDA kernel once built) is chosen here, so
kernels slot in without touching the model.
"""
from __future__ import annotations

import torch

from .reference import ms_deform_attn_reference


def multi_scale_deformable_attention(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                     level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                     attention_weights: torch.Tensor, im2col_step: int = 64) -> torch.Tensor:
    """Interface of the original `MSDeformAttnFunction`; returns [N, Lq, M*D]."""
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


__all__ = ["multi_scale_deformable_attention", "ms_deform_attn_reference"]
