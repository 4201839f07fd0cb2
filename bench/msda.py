"""Multi-scale deformable attention: compiled kernels against the PyTorch reference.

Realistic shapes: batch 2, 8 heads of 32 channels, 4 levels of an 800x1333 image (strides
8, 16, 32, 64), 4 points; 300 decoder queries and the full encoder query set (every pixel of
every level). For each device it times, interleaved in the same run, the PyTorch reference and
the compiled kernel (CPU: float32; CUDA: float32, float16, bfloat16), forward and
forward+backward, min/median/max over the repeats after warm-up, and checks the kernel's
results against the reference on the same inputs.

Bandwidth: each figure also says how many bytes the call must move at least (value, locations
and weights read once, the output written once; the backward adds grad_output and the three
gradients) divided by its median time, as a fraction of the device's copy bandwidth
(`torch.Tensor.copy_` of a 256 MiB buffer, device to device) measured in the same run. The
kernels gather 4 corners per sample, so they re-read value and a fraction well below 1 is
expected; it says how far from memory-bound a kernel is.

The CPU kernel is also timed with 1, 2, ... all cores (torch.set_num_threads; `--no-scaling` skips it),
and on the encoder case with every sample moved off the map, onto one pixel, or scattered at
random, or at random within a small cached window (`kernel_phases`; `--no-phases` skips it): where its
time goes, as differences of those.
`--tiny` uses a small image (for a dry run / a test). Prints a table and writes JSON
(default bench/results/msda.json).

    OMP_NUM_THREADS=2 python3 bench/msda.py [--repeats 7] [--device cpu|cuda|all] [--no-scaling] [--tiny]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, machine, ratio_spread, spread, time_interleaved, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "msda.json")
IMAGE = (800, 1333)
TINY_IMAGE = (64, 64)
STRIDES = (8, 16, 32, 64)
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4


def level_shapes(image=IMAGE) -> list[tuple[int, int]]:
    return [(math.ceil(image[0] / s), math.ceil(image[1] / s)) for s in STRIDES]


def reference_points(queries: int, shapes, generator: torch.Generator) -> torch.Tensor:
    """[queries, 2] normalised (x, y): every pixel centre of every level for the encoder query
    set (as the encoder does), uniform positions for decoder queries."""
    if queries != sum(h * w for h, w in shapes):
        return torch.rand(queries, 2, generator=generator)
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    return torch.cat(points)


def make_inputs(queries: int, device: str, dtype: torch.dtype, image=IMAGE, seed: int = 0):
    """Inputs shaped like the model's: each query samples a few pixels around its reference
    point on every level (offsets ~ N(0, 2 px)), so memory access has the model's locality.
    Locations and weights are float32 (float64 for float64 values), as the model feeds them."""
    generator = torch.Generator().manual_seed(seed)
    level_list = level_shapes(image)
    shapes = torch.tensor(level_list, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(STRIDES)
    value = torch.randn(BATCH, int(sizes.sum()), HEADS, CHANNELS, generator=generator)
    offsets = 2.0 * torch.randn(BATCH, queries, HEADS, levels, POINTS, 2, generator=generator)
    level_size = shapes.flip(-1).view(1, 1, 1, levels, 1, 2).float()  # (W, H) per level
    locations = reference_points(queries, level_list, generator).view(1, queries, 1, 1, 1, 2) + offsets / level_size
    weights = torch.rand(BATCH, queries, HEADS, levels * POINTS, generator=generator).softmax(-1)
    weights = weights.view(BATCH, queries, HEADS, levels, POINTS)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    return (value.to(device, dtype), shapes.to(device), starts.to(device), locations.to(device, coord),
            weights.to(device, coord))


def implementation_fn(name: str):
    from deformable_detr.ops import kernels
    from deformable_detr.ops.reference import ms_deform_attn_reference

    if name == "reference":
        return lambda v, s, i, loc, w: ms_deform_attn_reference(v, s, loc.to(v.dtype), w.to(v.dtype))
    extension = kernels.load(name)
    return lambda v, s, i, loc, w: kernels.run_kernel(extension, v, s, i, loc, w)


def synchronizer(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def run_case(fn, inputs, grad):
    value, shapes, starts, locations, weights = [
        t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(value, shapes, starts, locations, weights)
    out.backward(grad)
    return out.detach(), value.grad, locations.grad, weights.grad


def relative_error(ours, theirs) -> float:
    """Largest relative L2 error over the output and the three gradients. (A max-abs measure
    would be dominated by the few samples that rounding puts on the other side of a pixel
    edge, where the location gradient jumps.)"""
    return max((torch.linalg.vector_norm(a.double() - b.double()) /
                torch.linalg.vector_norm(b.double()).clamp_min(1e-30)).item() for a, b in zip(ours, theirs))


def minimum_bytes(inputs, grad, backward: bool) -> int:
    """Bytes a call must move at least: its inputs read once and its outputs written once."""
    value, _, _, locations, weights = inputs
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    forward = size(value) + size(locations) + size(weights) + size(grad)  # output has grad's shape
    if not backward:
        return forward
    # + grad_output read, grad_value (accumulated in the coordinate dtype) written, grad loc/weights written
    return forward + size(grad) + value.numel() * locations.element_size() + size(locations) + size(weights)


def copy_bandwidth(device: str, repeats: int, mib: int = 256) -> dict:
    """Bytes/s of a device-to-device copy (read + write counted), min/median/max."""
    elements = mib * 2**20 // 4
    source = torch.empty(elements, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    samples = time_interleaved({"copy": lambda: target.copy_(source)}, repeats, warmup=2,
                               synchronize=synchronizer(device))["copy"]
    moved = 2 * source.numel() * source.element_size()
    stats = spread([moved / s for s in samples])
    return {"buffer_mib": mib, "bytes_per_s": stats}


def bench_case(device: str, dtype: torch.dtype, case: str, queries: int, image, repeats: int,
               kernel: str | None, copy_bps: float) -> list[dict]:
    inputs = make_inputs(queries, device, dtype, image)
    grad = torch.randn(BATCH, queries, HEADS * CHANNELS, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    reference = implementation_fn("reference")
    names = ["reference"] + ([kernel] if kernel else [])
    fns = {name: implementation_fn(name) for name in names}

    def forward(fn):
        def action():
            with torch.no_grad():
                fn(*inputs)
        return action

    sync = synchronizer(device)
    min_seconds = 0.02 if device == "cuda" else 0.0
    fwd = time_interleaved({n: forward(f) for n, f in fns.items()}, repeats, synchronize=sync, min_seconds=min_seconds)
    both = time_interleaved({n: (lambda f=f: run_case(f, inputs, grad)) for n, f in fns.items()}, repeats,
                            synchronize=sync, min_seconds=min_seconds)
    # The reference in float64 is the truth for every implementation (and dtype).
    truth = run_case(reference, [t.double() if t.is_floating_point() else t for t in inputs], grad.double())
    rows = []
    for name in names:
        row = {"device": device, "dtype": str(dtype).removeprefix("torch."), "case": case, "queries": queries,
               "implementation": name, "repeats": repeats,
               "forward_s": spread(fwd[name]), "forward_backward_s": spread(both[name]),
               "forward_speedup": ratio_spread(fwd["reference"], fwd[name]),
               "forward_backward_speedup": ratio_spread(both["reference"], both[name]),
               "relative_l2_error_vs_float64_reference": relative_error(run_case(fns[name], inputs, grad), truth)}
        for key, backward in (("forward", False), ("forward_backward", True)):
            moved = minimum_bytes(inputs, grad, backward)
            bps = moved / row[f"{key}_s"]["median"]
            row[f"{key}_min_bytes"] = moved
            row[f"{key}_bytes_per_s"] = bps
            row[f"{key}_fraction_of_copy_bandwidth"] = bps / copy_bps
        rows.append(row)
    return rows


def thread_scaling(image, repeats: int) -> list[dict]:
    """The CPU kernel on the encoder case with 1, 2, 4, ... all usable cores."""
    fn = implementation_fn("cpu")
    queries = sum(h * w for h, w in level_shapes(image))
    inputs = make_inputs(queries, "cpu", torch.float32, image)
    grad = torch.randn(BATCH, queries, HEADS * CHANNELS, generator=torch.Generator().manual_seed(1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = sorted({1, cores} | {2 ** k for k in range(1, 8) if 2 ** k < cores})
    before = torch.get_num_threads()
    rows = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)

            def forward():
                with torch.no_grad():
                    fn(*inputs)
            samples = time_interleaved({"forward": forward, "forward_backward": lambda: run_case(fn, inputs, grad)},
                                       repeats)
            rows.append({"threads": threads, "forward_s": spread(samples["forward"]),
                         "forward_backward_s": spread(samples["forward_backward"])})
    finally:
        torch.set_num_threads(before)
    base = rows[0]
    for row in rows:
        for key in ("forward", "forward_backward"):
            row[f"{key}_speedup_vs_1_thread"] = base[f"{key}_s"]["median"] / row[f"{key}_s"]["median"]
    return rows


def phase_inputs(inputs, where: str):
    """The encoder case's inputs with every sample moved, to take the kernel's phases apart:
    'outside': every sample off the map (the kernel computes each row's corners and writes the
    row, but reads no value); 'one_pixel': every sample at its level's centre (the gather's
    arithmetic with every read an L1 hit); 'cached_window': at random in an 8x8-pixel corner of
    each level (256 KiB of value, all heads: every read served by a core's L2 cache on common
    CPUs, rarely by L1); 'scattered': uniform random positions (no locality between neighbouring
    queries: the cache misses' worst case)."""
    value, shapes, starts, locations, weights = inputs
    if where == "outside":
        locations = torch.full_like(locations, -10.0)
    elif where == "one_pixel":
        locations = torch.full_like(locations, 0.5)
    elif where == "cached_window":
        corner = torch.rand(locations.shape, generator=torch.Generator().manual_seed(3), dtype=locations.dtype)
        size = shapes.flip(-1).to(locations.dtype).view(1, 1, 1, -1, 1, 2)  # (W, H) per level
        locations = (0.5 + corner * (CACHED_WINDOW - 1)) / size
    elif where == "scattered":
        locations = torch.rand(locations.shape, generator=torch.Generator().manual_seed(2), dtype=locations.dtype)
    return value, shapes, starts, locations, weights


CACHED_WINDOW = 8  # pixels on a side of each level's corner that 'cached_window' samples
PHASES = ("outside", "one_pixel", "cached_window", "model_like", "scattered")


def kernel_phases(image, repeats: int) -> dict:
    """The CPU kernel on the encoder case with the samples placed as in `phase_inputs`, interleaved,
    forward and forward+backward: outside = per-row corner arithmetic, prefetch and writes;
    one_pixel - outside = the gather's arithmetic; cached_window - one_pixel = reads served by the
    L2 cache instead of L1; model_like - cached_window = waiting for lines beyond L2."""
    fn = implementation_fn("cpu")
    queries = sum(h * w for h, w in level_shapes(image))
    inputs = make_inputs(queries, "cpu", torch.float32, image)
    grad = torch.randn(BATCH, queries, HEADS * CHANNELS, generator=torch.Generator().manual_seed(1))
    placed = {where: phase_inputs(inputs, where) for where in PHASES}

    def forward(args):
        def action():
            with torch.no_grad():
                fn(*args)
        return action
    fwd = time_interleaved({w: forward(a) for w, a in placed.items()}, repeats)
    both = time_interleaved({w: (lambda a=a: run_case(fn, a, grad)) for w, a in placed.items()}, repeats)
    return {"forward_s": {w: spread(v) for w, v in fwd.items()},
            "forward_backward_s": {w: spread(v) for w, v in both.items()}}


def main(argv=None) -> int:
    load_at_start = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per figure, after one warm-up")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the CPU kernel on 1..all cores (default: on; --no-scaling skips it)")
    parser.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the CPU kernel's encoder case with samples placed to take its phases apart")
    parser.add_argument("--tiny", action="store_true", help=f"a {TINY_IMAGE[0]}x{TINY_IMAGE[1]} image (quick check)")
    parser.add_argument("--output", default=RESULTS, help="JSON file to write")
    args = parser.parse_args(argv)
    from deformable_detr.ops import kernels
    from deformable_detr.runtime.logging import setup_logging

    setup_logging()
    image = TINY_IMAGE if args.tiny else IMAGE
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    skipped = []
    if "cuda" in devices and not torch.cuda.is_available():
        print("no GPU here: CUDA kernel not measured")
        skipped.append("cuda: no GPU")
        devices.remove("cuda")
    rows, bandwidth = [], {}
    shapes = level_shapes(image)
    for device in devices:
        kind = "cuda" if device == "cuda" else "cpu"
        try:
            kernels.load(kind)
            kernel = kind
        except kernels.KernelUnavailable as error:
            print(f"{kind} kernel unavailable: {error}")
            skipped.append(f"{kind} kernel: {error}")
            kernel = None
        bandwidth[device] = copy_bandwidth(device, max(args.repeats, 5), mib=16 if args.tiny else 256)
        dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
        for dtype in dtypes:
            for case, queries in (("decoder", 30 if args.tiny else 300), ("encoder", sum(h * w for h, w in shapes))):
                rows += bench_case(device, dtype, case, queries, image, args.repeats, kernel,
                                   bandwidth[device]["bytes_per_s"]["median"])
    scaling = thread_scaling(image, args.repeats) if args.scaling and "cpu" in devices and \
        kernels.is_built("cpu") else None
    phases = kernel_phases(image, args.repeats) if args.phases and "cpu" in devices and \
        kernels.is_built("cpu") else None

    info = machine(load_at_start)
    print(f"levels {shapes}, batch {BATCH}, {HEADS} heads x {CHANNELS} channels, {POINTS} points; "
          f"{info['cpu_model']}, {torch.get_num_threads()} threads, load at start {info['load_at_start_1_5_15min']}")
    for device, bw in bandwidth.items():
        print(f"{device} copy bandwidth: {fmt(bw['bytes_per_s'], 1e-9)} GB/s (median (min-max))")
    print(f"{'device':6s} {'dtype':8s} {'case':8s} {'impl':9s} {'fwd ms med (min-max)':>24s} {'x ref':>17s} "
          f"{'fwd+bwd ms':>24s} {'x ref':>17s} {'fwd %bw':>7s} {'rel err':>8s}")
    for r in rows:
        print(f"{r['device']:6s} {r['dtype']:8s} {r['case']:8s} {r['implementation']:9s} "
              f"{fmt(r['forward_s'], 1e3):>24s} {fmt(r['forward_speedup'], 1, 1):>17s} "
              f"{fmt(r['forward_backward_s'], 1e3):>24s} {fmt(r['forward_backward_speedup'], 1, 1):>17s} "
              f"{100 * r['forward_fraction_of_copy_bandwidth']:6.1f}% "
              f"{r['relative_l2_error_vs_float64_reference']:8.1e}")
    if scaling:
        print("CPU kernel, encoder case, by threads: " + ", ".join(
            f"{s['threads']}: fwd {s['forward_s']['median'] * 1e3:.0f} ms ({s['forward_speedup_vs_1_thread']:.2f}x), "
            f"fwd+bwd {s['forward_backward_s']['median'] * 1e3:.0f} ms ({s['forward_backward_speedup_vs_1_thread']:.2f}x)"
            for s in scaling))
    if phases:
        print("CPU kernel, encoder case, samples placed (ms, median (min-max)): " + "; ".join(
            f"{w}: fwd {fmt(phases['forward_s'][w], 1e3, 0)}, fwd+bwd {fmt(phases['forward_backward_s'][w], 1e3, 0)}"
            for w in PHASES))
    write_json(args.output, {"machine": info, "image": list(image), "levels": shapes,
                             "config": {"batch": BATCH, "heads": HEADS, "channels": CHANNELS, "points": POINTS},
                             "copy_bandwidth": bandwidth, "rows": rows, "thread_scaling": scaling,
                             "kernel_phases": phases, "skipped": skipped})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
