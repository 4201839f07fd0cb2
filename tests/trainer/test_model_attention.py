"""Deformable attention core: the PyTorch reference against a per-point loop, and float64 gradcheck."""
from __future__ import annotations

import torch

from deformable_detr.ops.reference import ms_deform_attn_reference

SHAPES = torch.tensor([[6, 4], [3, 5], [2, 2]])


def random_inputs(dtype=torch.float64, batch=2, queries=5, heads=2, channels=3, points=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    levels = len(SHAPES)
    total = int((SHAPES[:, 0] * SHAPES[:, 1]).sum())
    value = torch.randn(batch, total, heads, channels, generator=generator, dtype=dtype)
    # Some locations fall outside [0, 1] to exercise the zero padding.
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, locations, weights


def per_point_loop(value, shapes, locations, weights):
    """Bilinear sampling written out point by point (pixel centres at +0.5, zeros outside)."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, channels, dtype=value.dtype)
    starts = [0] + torch.cumsum(shapes[:, 0] * shapes[:, 1], 0).tolist()[:-1]
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl in range(levels):
                    h, w = shapes[lvl].tolist()
                    grid = value[b, starts[lvl]:starts[lvl] + h * w, m].view(h, w, channels)
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0] * w - 0.5
                        y = locations[b, q, m, lvl, p, 1] * h - 0.5
                        x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                        sample = torch.zeros(channels, dtype=value.dtype)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                sample += (1 - abs(x - xx)) * (1 - abs(y - yy)) * grid[yy, xx]
                        out[b, q, m] += weights[b, q, m, lvl, p] * sample
    return out.flatten(2)


def test_reference_equals_per_point_sampling():
    value, locations, weights = random_inputs()
    expected = per_point_loop(value, SHAPES, locations, weights)
    torch.testing.assert_close(ms_deform_attn_reference(value, SHAPES, locations, weights), expected)


def test_reference_gradients_match_finite_differences():
    value, locations, weights = random_inputs(batch=1, queries=3)
    inputs = tuple(t.clone().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w), inputs,
                                    eps=1e-6, atol=1e-5)
