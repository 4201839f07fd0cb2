"""Multi-scale deformable attention in plain PyTorch (bilinear sampling with grid_sample).

The reference every compiled kernel is checked against, and the path ONNX export with
standard ops traces through.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: torch.Tensor,
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """
    value:              [N, S, M, D]   S = sum of H_l * W_l over levels, M heads, D channels per head
    spatial_shapes:     [L, 2]         (H_l, W_l) per level
    sampling_locations: [N, Lq, M, L, P, 2]  normalised (x, y) in [0, 1]
    attention_weights:  [N, Lq, M, L, P]
    returns             [N, Lq, M * D]
    """
    n, _, heads, channels = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()] if not torch.jit.is_tracing() else \
        [h * w for h, w in spatial_shapes]
    value_list = value.split(sizes, dim=1)
    # grid_sample takes coordinates in [-1, 1]; align_corners=False matches the CUDA kernel's -0.5 pixel shift.
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value_list[level].flatten(2).transpose(1, 2).reshape(n * heads, channels, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, D, Lq, L*P] weighted by [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, num_queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, heads * channels, num_queries).transpose(1, 2).contiguous()
