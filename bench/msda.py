"""Multi-scale deformable attention: compiled kernels against the PyTorch reference.

Realistic shapes: batch 2, 8 heads of 32 channels, 4 levels of an 800x1333 image (strides
8, 16, 32, 64), 4 points; 300 decoder queries and the full encoder query set (every pixel of
every level). For each available implementation (the reference, the CPU kernel, and the
CUDA kernel where a GPU is present) it times the forward and the forward+backward, checks
the results against the reference run on the same inputs, prints a table and writes
bench/results/msda.json.

    OMP_NUM_THREADS=2 python3 bench/msda.py [--repeats 3] [--device cpu|cuda|all]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "msda.json")
IMAGE = (800, 1333)
STRIDES = (8, 16, 32, 64)
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4


def level_shapes() -> list[tuple[int, int]]:
    return [(math.ceil(IMAGE[0] / s), math.ceil(IMAGE[1] / s)) for s in STRIDES]


def reference_points(queries: int, generator: torch.Generator) -> torch.Tensor:
    """[queries, 2] normalised (x, y): every pixel centre of every level for the encoder query
    set (as the encoder does), uniform positions for decoder queries."""
    shapes = level_shapes()
    if queries != sum(h * w for h, w in shapes):
        return torch.rand(queries, 2, generator=generator)
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    return torch.cat(points)


def make_inputs(queries: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Inputs shaped like the model's: each query samples a few pixels around its reference
    point on every level (offsets ~ N(0, 2 px)), so memory access has the model's locality."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes(), dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(STRIDES)
    value = torch.randn(BATCH, int(sizes.sum()), HEADS, CHANNELS, generator=generator)
    offsets = 2.0 * torch.randn(BATCH, queries, HEADS, levels, POINTS, 2, generator=generator)
    level_size = shapes.flip(-1).view(1, 1, 1, levels, 1, 2).float()  # (W, H) per level
    locations = reference_points(queries, generator).view(1, queries, 1, 1, 1, 2) + offsets / level_size
    weights = torch.rand(BATCH, queries, HEADS, levels * POINTS, generator=generator).softmax(-1)
    weights = weights.view(BATCH, queries, HEADS, levels, POINTS)
    value, locations, weights = (t.to(device, dtype) for t in (value, locations, weights))
    return value, shapes.to(device), starts.to(device), locations, weights


def implementation_fn(name: str):
    from deformable_detr.ops import kernels
    from deformable_detr.ops.reference import ms_deform_attn_reference

    if name == "reference":
        return lambda v, s, i, loc, w: ms_deform_attn_reference(v, s, loc, w)
    extension = kernels.load(name)
    return lambda v, s, i, loc, w: kernels.run_kernel(extension, v, s, i, loc, w)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(action, device: str, repeats: int) -> float:
    action()  # warm-up (allocator, caches, lazy CUDA init)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(fn, inputs, grad):
    value, shapes, starts, locations, weights = [
        t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(value, shapes, starts, locations, weights)
    out.backward(grad)
    return out.detach(), value.grad, locations.grad, weights.grad


def relative_error(ours, theirs) -> float:
    """Largest relative L2 error over the output and the three gradients. (A max-abs measure
    would be dominated by the few samples that float32 rounding puts on the other side of a
    pixel edge, where the location gradient jumps.)"""
    return max((torch.linalg.vector_norm(a.double() - b.double()) /
                torch.linalg.vector_norm(b.double()).clamp_min(1e-30)).item() for a, b in zip(ours, theirs))


def bench_device(device: str, dtype: torch.dtype, repeats: int) -> list[dict]:
    from deformable_detr.ops import kernels

    names = ["reference"]
    kind = "cuda" if device == "cuda" else "cpu"
    try:
        kernels.load(kind)
        names.append(kind)
    except kernels.KernelUnavailable as error:
        print(f"{kind} kernel unavailable: {error}")
    encoder_queries = sum(h * w for h, w in level_shapes())
    rows = []
    for case, queries in (("decoder", 300), ("encoder", encoder_queries)):
        inputs = make_inputs(queries, device, dtype)
        grad = torch.randn(BATCH, queries, HEADS * CHANNELS, generator=torch.Generator().manual_seed(1))
        grad = grad.to(device, dtype)
        case_repeats = repeats if case == "encoder" or device == "cuda" else repeats * 5
        reference_results = run_case(implementation_fn("reference"), inputs, grad)
        timings = {}
        for name in names:
            fn = implementation_fn(name)
            with torch.no_grad():
                forward = time_call(lambda: fn(*inputs), device, case_repeats)
            both = time_call(lambda: run_case(fn, inputs, grad), device, case_repeats)
            error = relative_error(run_case(fn, inputs, grad), reference_results)
            timings[name] = (forward, both)
            rows.append({"device": device, "dtype": str(dtype).removeprefix("torch."), "case": case,
                         "queries": queries, "implementation": name, "forward_ms": forward * 1e3,
                         "forward_backward_ms": both * 1e3,
                         "forward_speedup": timings["reference"][0] / forward,
                         "forward_backward_speedup": timings["reference"][1] / both,
                         "relative_l2_error_vs_reference": error, "repeats": case_repeats})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = parser.parse_args(argv)
    from deformable_detr.runtime.files import write_text_atomic
    from deformable_detr.runtime.logging import setup_logging

    setup_logging()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("no GPU here: CUDA kernel not measured")
        devices.remove("cuda")
    rows = []
    for device in devices:
        dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
        for dtype in dtypes:
            rows += bench_device(device, dtype, args.repeats)
    print(f"levels {level_shapes()}, batch {BATCH}, {HEADS} heads x {CHANNELS} channels, {POINTS} points, "
          f"{torch.get_num_threads()} CPU threads")
    header = (f"{'device':6s} {'dtype':8s} {'case':8s} {'queries':>7s} {'impl':9s} {'fwd ms':>9s} {'x ref':>6s} "
              f"{'fwd+bwd ms':>11s} {'x ref':>6s} {'rel L2 err':>11s}")
    print(header)
    for r in rows:
        print(f"{r['device']:6s} {r['dtype']:8s} {r['case']:8s} {r['queries']:>7d} {r['implementation']:9s} "
              f"{r['forward_ms']:9.1f} {r['forward_speedup']:6.2f} {r['forward_backward_ms']:11.1f} "
              f"{r['forward_backward_speedup']:6.2f} {r['relative_l2_error_vs_reference']:11.2e}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    write_text_atomic(RESULTS, json.dumps({"rows": rows, "threads": torch.get_num_threads(), "gpu": gpu,
                                           "levels": level_shapes()}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
