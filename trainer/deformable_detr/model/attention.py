"""Multi-scale deformable attention module (parameters named as in the original `MSDeformAttn`)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def _default_core(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
    # Looked up at call time so that ops' dispatch (reference / CPU / CUDA kernel) decides.
    return ops.multi_scale_deformable_attention(value, spatial_shapes, level_start_index,
                                                sampling_locations, attention_weights, im2col_step)


class MSDeformAttn(nn.Module):
    """Each query samples `n_points` values per head and level around its reference point.

    `core` is the sampling-and-weighting function; export swaps it (plain ONNX ops or the
    TensorRT plugin node) without touching the parameters.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.core: Callable = _default_core
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Initial offsets point in n_heads directions, at distances 1..n_points (as the original).
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        query [N, Lq, C]; reference_points [N, Lq, L, 2] (x, y) or [N, Lq, L, 4] (cx, cy, w, h) in [0, 1];
        input_flatten [N, S, C]; input_spatial_shapes [L, 2] (H, W); input_padding_mask [N, S] True on padding.
        """
        n, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        sampling_locations = self._sampling_locations(reference_points, sampling_offsets, input_spatial_shapes)
        output = self.core(value, input_spatial_shapes, input_level_start_index, sampling_locations,
                           attention_weights, self.im2col_step)
        return self.output_proj(output)

    def _sampling_locations(self, reference_points: torch.Tensor, sampling_offsets: torch.Tensor,
                            input_spatial_shapes: torch.Tensor) -> torch.Tensor:
        """reference + offset for every head, level and point -> [N, Lq, M, L, P, 2].

        The original's arithmetic, element for element, but each per-level factor is first
        repeated over the points (N x Lq x L x P x 2 values, 1/8 of the result) so that the
        broadcasts run over whole contiguous rows of L*P*2 numbers: broadcasting a last dimension
        of 2 took 13 ms of CPU per encoder layer at 256 px, this 1 ms.
        """
        n, len_q, n_heads, n_levels, n_points, _ = sampling_offsets.shape
        row = n_levels * n_points * 2
        offsets = sampling_offsets.reshape(n, len_q, n_heads, row)

        def per_point(per_level: torch.Tensor) -> torch.Tensor:  # [..., L, 2] -> [..., 1, L*P*2]
            expanded = per_level.unsqueeze(-2).expand(*per_level.shape[:-1], n_points, 2)
            return expanded.reshape(*per_level.shape[:-2], 1, row)

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W, H).
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = per_point(reference_points) + offsets / per_point(offset_normalizer)
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the reference box size.
            locations = per_point(reference_points[..., :2]) \
                + offsets / n_points * per_point(reference_points[..., 2:]) * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        return locations.view(n, len_q, n_heads, n_levels, n_points, 2)
