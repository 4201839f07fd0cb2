"""Compiled multi-scale deformable attention against the PyTorch reference, and the dispatch."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from deformable_detr import ops
from deformable_detr.errors import UsageError
from deformable_detr.ops import kernels
from deformable_detr.ops.reference import ms_deform_attn_reference

HAS_TOOLCHAIN = shutil.which("c++") is not None and shutil.which("ninja") is not None
needs_toolchain = pytest.mark.skipif(not HAS_TOOLCHAIN, reason="no C++ compiler or ninja to build the CPU kernel")


@pytest.fixture(scope="module")
def cpu_kernel():
    """The CPU extension, built once into the persistent cache (about 30 s the first time)."""
    if not HAS_TOOLCHAIN:
        pytest.skip("no C++ compiler or ninja to build the CPU kernel")
    (kernels.build_directory("cpu") / "FAILED").unlink(missing_ok=True)
    return kernels.build("cpu")


def make_inputs(shapes: list[tuple[int, int]], batch: int, heads: int, channels: int, queries: int,
                points: int, dtype: torch.dtype, seed: int, margin: float = 0.2, device: str = "cpu"):
    """Random MSDA inputs; sampling locations reach `margin` beyond the map on every side."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=torch.float64)
    locations = locations * (1 + 2 * margin) - margin
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    tensors = [t.to(device=device, dtype=dtype) for t in (value, locations, weights)]
    return tensors[0], spatial_shapes.to(device), level_start_index.to(device), tensors[1], tensors[2]


def kernel_output(extension, value, spatial_shapes, level_start_index, locations, weights):
    return kernels.run_kernel(extension, value, spatial_shapes, level_start_index, locations, weights)


def reference_output(value, spatial_shapes, level_start_index, locations, weights):
    return ms_deform_attn_reference(value, spatial_shapes, locations, weights)


def outputs_and_grads(fn, inputs, grad_seed: int = 0):
    value, spatial_shapes, level_start_index, locations, weights = [
        t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(value, spatial_shapes, level_start_index, locations, weights)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(grad.to(out.device, out.dtype))
    return out.detach(), value.grad, locations.grad, weights.grad


RANDOM_CASES = [  # (level shapes, batch, heads, channels, queries, points)
    ([(7, 5), (4, 3), (1, 1)], 2, 2, 3, 4, 3),
    ([(5, 9), (3, 5)], 1, 3, 4, 5, 2),
    ([(6, 6), (3, 3), (2, 2), (1, 2)], 2, 1, 5, 3, 4),
    # Channel counts the CPU kernel compiles as constants (8, 16, 32, 64): their own code paths.
    ([(5, 6), (3, 2)], 1, 2, 8, 4, 2),
    ([(4, 7), (2, 3), (1, 1)], 2, 1, 16, 3, 3),
]


@needs_toolchain
@pytest.mark.parametrize("case", range(len(RANDOM_CASES)))
def test_cpu_kernel_gradcheck_float64(cpu_kernel, case):
    shapes, batch, heads, channels, queries, points = RANDOM_CASES[case]
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        shapes, batch, heads, channels, queries, points, torch.float64, seed=case)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]

    def fn(v, loc, w):
        return kernel_output(cpu_kernel, v, spatial_shapes, level_start_index, loc, w)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@needs_toolchain
def test_cpu_backward_splits_queries_when_threads_outnumber_batch_times_heads(cpu_kernel):
    """1 batch x 2 heads = 2 (batch, head) pairs on 8 threads: the backward also splits the
    queries (4 slices per pair, each with its own grad_value buffer). Gradients stay exact
    (gradcheck) and equal to the single-thread ones."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        [(7, 5), (4, 3)], 1, 2, 3, 9, 2, torch.float64, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        assert torch.autograd.gradcheck(
            lambda v, loc, w: kernel_output(cpu_kernel, v, spatial_shapes, level_start_index, loc, w),
            inputs, eps=1e-6, atol=1e-5)
        split = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a),
                                  [value, spatial_shapes, level_start_index, locations, weights])
        torch.set_num_threads(1)
        single = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a),
                                   [value, spatial_shapes, level_start_index, locations, weights])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(split, single):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_toolchain
@pytest.mark.parametrize("case", range(len(RANDOM_CASES)))
def test_cpu_kernel_matches_reference_float64(cpu_kernel, case):
    shapes, batch, heads, channels, queries, points = RANDOM_CASES[case]
    inputs = make_inputs(shapes, batch, heads, channels, queries, points, torch.float64, seed=10 + case)
    ours = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a), inputs)
    theirs = outputs_and_grads(reference_output, inputs)
    for name, a, b in zip(["output", "grad value", "grad locations", "grad weights"], ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@needs_toolchain
@pytest.mark.parametrize("dtype,channels", [(torch.float64, 5), (torch.float32, 32)])
def test_encoder_sized_query_sets_read_value_heads_first_with_the_same_results(cpu_kernel, dtype, channels):
    """As many queries as pixels (an encoder) makes the CPU kernel copy `value` with its heads
    first (and scatter into a heads-first grad_value); a few queries (a decoder) read it as given.
    Each query gets the same forward bits either way, and output and gradients match float64."""
    shapes = [(9, 11), (5, 6), (3, 3)]  # 138 pixels
    queries, few = 145, 20  # 145: not a whole number of the forward's 32-query blocks
    inputs = make_inputs(shapes, 2, 3, channels, queries, 3, dtype, seed=21)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    many_out = kernel_output(cpu_kernel, *inputs)
    few_out = kernel_output(cpu_kernel, value, spatial_shapes, level_start_index,
                            locations[:, :few].contiguous(), weights[:, :few].contiguous())
    assert torch.equal(many_out[:, :few], few_out)
    threads = torch.get_num_threads()
    try:  # one thread takes the same 32-query blocks in turn
        torch.set_num_threads(1)
        assert torch.equal(kernel_output(cpu_kernel, *inputs), many_out)
    finally:
        torch.set_num_threads(threads)
    ours = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a), inputs)
    truth = outputs_and_grads(reference_output, [t.double() if t.is_floating_point() else t for t in inputs])
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for name, a, b in zip(["output", "grad value", "grad locations", "grad weights"], ours, truth):
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance, msg=name)


# A scaled-down realistic configuration: 8 heads of 32 channels, 4 levels of a 200x333 image
# (strides 8..64), 4 points, 100 decoder-like queries.
REALISTIC_SHAPES = [(25, 42), (13, 21), (7, 11), (4, 6)]


@needs_toolchain
def test_cpu_kernel_matches_reference_float32_realistic(cpu_kernel):
    inputs = make_inputs(REALISTIC_SHAPES, 2, 8, 32, 100, 4, torch.float32, seed=3, margin=0.05)
    ours = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a), inputs)
    theirs = outputs_and_grads(reference_output, inputs)
    truth = outputs_and_grads(reference_output, [t.double() if t.is_floating_point() else t for t in inputs])
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[3], theirs[3], rtol=1e-4, atol=1e-4)
    # Location gradients scale with the map size; compare relative to their magnitude.
    scale = truth[2].abs().max().item()
    assert (ours[2].double() - truth[2]).abs().max().item() <= 1e-5 * scale
    # At least as accurate as the reference, measured against float64.
    for ours_t, theirs_t, truth_t in zip(ours, theirs, truth):
        our_error = (ours_t.double() - truth_t).abs().max().item()
        their_error = (theirs_t.double() - truth_t).abs().max().item()
        assert our_error <= 2 * their_error + 1e-6 * truth_t.abs().max().item()


@needs_toolchain
def test_reused_output_blocks_are_fully_rewritten_and_never_shared(cpu_kernel):
    """The kernel's outputs come from a cache of freed blocks: a block handed out again holds the
    last user's numbers (here NaN), and every entry must still be written; two live outputs never
    share memory. (1200 queries: the output and every gradient take at least one 2 MiB block.)"""
    inputs = make_inputs(REALISTIC_SHAPES, 2, 8, 32, 1200, 4, torch.float32, seed=5, margin=0.3)
    first = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a), inputs)
    pointers = {t.data_ptr() for t in first}
    for tensor in first:
        tensor.fill_(float("nan"))
    del first
    again = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a), inputs)
    assert pointers & {t.data_ptr() for t in again}, "freed blocks were not reused"
    theirs = outputs_and_grads(reference_output, inputs)
    for ours_t, theirs_t in zip(again, theirs):
        assert torch.isfinite(ours_t).all()
        torch.testing.assert_close(ours_t, theirs_t, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        live = [kernel_output(cpu_kernel, *inputs) for _ in range(3)]
    ends = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in live)
    assert all(end <= start for (_, end), (start, _) in zip(ends, ends[1:]))


@needs_toolchain
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_kernel_half_precision_is_as_accurate_as_reference(cpu_kernel, dtype):
    inputs = make_inputs([(9, 7), (5, 4)], 1, 2, 16, 12, 4, dtype, seed=5)
    ours = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a), inputs)
    theirs = outputs_and_grads(reference_output, inputs)
    truth = outputs_and_grads(reference_output, [t.double() if t.is_floating_point() else t for t in inputs])
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == dtype
    for ours_t, theirs_t, truth_t in zip(ours, theirs, truth):
        our_error = (ours_t.double() - truth_t).abs().max().item()
        their_error = (theirs_t.double() - truth_t).abs().max().item()
        assert our_error <= their_error + 1e-3 * truth_t.abs().max().item()


@needs_toolchain
def test_kernel_accepts_non_contiguous_and_mixed_dtype_inputs(cpu_kernel):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        [(6, 5), (3, 3)], 2, 2, 4, 7, 2, torch.float32, seed=7)
    strided_value = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not strided_value.is_contiguous()
    out = kernel_output(cpu_kernel, strided_value, spatial_shapes, level_start_index, locations.double(), weights)
    expected = reference_output(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@needs_toolchain
@pytest.mark.parametrize("channels", [3, 32])
def test_far_away_locations_sample_zero_like_the_reference(cpu_kernel, channels):
    """Locations far outside the map (which an integer conversion would overflow) and exactly on
    the edges: the same output and gradients as the reference, and nothing read out of bounds."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        [(5, 4), (2, 3)], 1, 2, channels, 6, 3, torch.float64, seed=9)
    locations = locations.clone()
    locations[:, 0] = 1e12
    locations[:, 1] = -1e12
    locations[:, 2, :, :, :, 0] = 0.0
    locations[:, 3, :, :, :, 1] = 1.0
    inputs = [value, spatial_shapes, level_start_index, locations, weights]
    ours = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a), inputs)
    theirs = outputs_and_grads(reference_output, inputs)
    assert ours[0][:, :2].abs().max().item() == 0
    for name, a, b in zip(["output", "grad value", "grad locations", "grad weights"], ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@needs_toolchain
@pytest.mark.parametrize("channels", [8, 16, 64])
def test_float32_constant_channel_paths_match_float64_reference(cpu_kernel, channels):
    """float32 with 8, 16 or 64 channels (the vector paths of forward and backward; 32 is the
    realistic test's), all heads of a query at once, some samples off the map (whose gradients the
    backward writes, into buffers it does not clear first) and one query far away."""
    inputs = make_inputs([(6, 9), (3, 5), (2, 2)], 2, 3, channels, 7, 3, torch.float32, seed=11)
    inputs[3][:, 0] = 1e12
    truth = outputs_and_grads(reference_output, [t.double() if t.is_floating_point() else t for t in inputs])
    for _ in range(2):  # the second call gets memory the first one freed
        ours = outputs_and_grads(lambda *a: kernel_output(cpu_kernel, *a), inputs)
        assert ours[0][:, 0].abs().max().item() == 0
        assert ours[2][:, 0].abs().max().item() == 0 and ours[3][:, 0].abs().max().item() == 0
        for name, a, b in zip(["output", "grad value", "grad locations", "grad weights"], ours, truth):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


@needs_toolchain
def test_kernel_rejects_mismatched_shapes(cpu_kernel):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        [(6, 5), (3, 3)], 1, 2, 4, 3, 2, torch.float32, seed=8)
    with pytest.raises(RuntimeError, match="spatial_shapes"):
        kernel_output(cpu_kernel, value, spatial_shapes[:1], level_start_index, locations, weights)


@needs_toolchain
@pytest.mark.parametrize("fault,message", [
    ("short_value", "spatial_shapes add up to 47 positions .* but value has S = 10"),
    ("long_value", "spatial_shapes add up to 47 positions .* but value has S = 60"),
    ("bad_start", r"level_start_index\[1\] = 5 but the levels before it hold 30"),
    ("nonzero_first_start", r"level_start_index\[0\] = 1 but the levels before it hold 0"),
    ("zero_width", r"spatial_shapes\[1\] = \(3, 0\) must be positive"),
])
def test_kernel_rejects_levels_that_do_not_fit_value(cpu_kernel, fault, message):
    """Shapes that do not add up to S would read (and the backward write) outside `value`: both
    passes refuse them with a message naming the numbers, before touching memory."""
    shapes = [(6, 5), (3, 3), (2, 4)]  # 30 + 9 + 8 = 47 positions
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        shapes, 1, 2, 4, 3, 2, torch.float32, seed=9)
    if fault == "short_value":
        value = value[:, :10].contiguous()
    elif fault == "long_value":
        value = torch.cat([value, value[:, :13]], 1)
    elif fault == "bad_start":
        level_start_index = torch.tensor([0, 5, 39])
    elif fault == "nonzero_first_start":
        level_start_index = level_start_index + 1
    elif fault == "zero_width":
        spatial_shapes = torch.tensor([[6, 5], [3, 0], [2, 4]])
    with pytest.raises(RuntimeError, match=message):
        kernel_output(cpu_kernel, value, spatial_shapes, level_start_index, locations, weights)
    # The backward checks too (it is the pass that would write out of bounds).
    grad = torch.zeros(1, 3, 8)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernel.backward(value, spatial_shapes, level_start_index, locations, weights, grad)


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@needs_toolchain
def test_dispatch_uses_cpu_kernel_and_logs_once(cpu_kernel, monkeypatch):
    monkeypatch.delenv(ops.IMPL_ENV, raising=False)
    ops._announced.clear()
    inputs = make_inputs([(6, 5), (3, 3)], 1, 2, 4, 3, 2, torch.float32, seed=9)
    logger = logging.getLogger("deformable_detr.ops")
    handler, level = RecordingHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert ops.select_implementation(torch.device("cpu")) == "cpu"
        out = ops.multi_scale_deformable_attention(*inputs, im2col_step=64)
        ops.multi_scale_deformable_attention(*inputs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [m for m in handler.messages if "deformable attention on cpu" in m]
    assert lines == ["multi-scale deformable attention on cpu: compiled cpu kernel"]
    torch.testing.assert_close(out, reference_output(*inputs), rtol=1e-5, atol=1e-6)


def test_forced_reference_and_bad_values(monkeypatch):
    monkeypatch.setenv(ops.IMPL_ENV, "reference")
    assert ops.select_implementation(torch.device("cpu")) == "reference"
    monkeypatch.setenv(ops.IMPL_ENV, "triton")
    with pytest.raises(UsageError, match="DDETR_MSDA_IMPL='triton'.*accepted: auto, reference, cpu, cuda"):
        ops.select_implementation(torch.device("cpu"))
    monkeypatch.setenv(ops.IMPL_ENV, "cuda")
    with pytest.raises(UsageError, match="DDETR_MSDA_IMPL=cuda but the tensors are on cpu"):
        ops.select_implementation(torch.device("cpu"))


@needs_toolchain
def test_tracing_goes_through_the_reference(cpu_kernel, monkeypatch):
    monkeypatch.setenv(ops.IMPL_ENV, "cpu")
    inputs = make_inputs([(6, 5), (3, 3)], 1, 2, 4, 3, 2, torch.float32, seed=11)
    traced = torch.jit.trace(lambda v, loc, w: ops.multi_scale_deformable_attention(
        v, inputs[1], inputs[2], loc, w), (inputs[0], inputs[3], inputs[4]))
    assert "grid_sampler" in str(traced.graph)


def test_unavailable_kernel_falls_back_or_fails_when_forced(tmp_path):
    """With a recorded failed build (as after a compiler error), auto mode runs the reference
    with one log line, and a forced kernel is a usage error."""
    script = (
        "import torch, sys\n"
        "from deformable_detr.runtime.logging import setup_logging\n"
        "from deformable_detr.ops import kernels, multi_scale_deformable_attention as msda\n"
        "from deformable_detr.errors import UsageError\n"
        "setup_logging()\n"
        "d = kernels.build_directory('cpu'); d.mkdir(parents=True)\n"
        "(d / 'FAILED').write_text('c++: fatal error: no input files\\n')\n"
        "shapes = torch.tensor([[4, 5]]); start = torch.tensor([0])\n"
        "args = (torch.randn(1, 20, 2, 4), shapes, start, torch.rand(1, 3, 2, 1, 2, 2), torch.rand(1, 3, 2, 1, 2))\n"
        "print(tuple(msda(*args).shape)); msda(*args)\n"
        "import os; os.environ['DDETR_MSDA_IMPL'] = 'cpu'\n"
        "try:\n    msda(*args)\nexcept UsageError as e:\n    print('UsageError:', e)\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), DDETR_MSDA_IMPL="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(1, 3, 8)" in result.stdout
    fallback = [line for line in result.stderr.splitlines() if "deformable attention on cpu" in line]
    assert len(fallback) == 1 and "PyTorch reference (cpu kernel unavailable: an earlier build failed" in fallback[0]
    assert "UsageError: DDETR_MSDA_IMPL=cpu: the cpu kernel is unavailable" in result.stdout


@needs_toolchain
def test_build_command_clears_a_failed_build_and_reports_the_cache(cpu_kernel):
    """`python -m deformable_detr.ops.build` (what install steps run) retries past a FAILED
    marker; with the kernel already compiled it only re-imports it."""
    failed = kernels.build_directory("cpu") / "FAILED"
    failed.write_text("stale failure\n")
    try:
        result = subprocess.run([sys.executable, "-m", "deformable_detr.ops.build", "--kind", "cpu"],
                                capture_output=True, text=True, timeout=600)
        assert not failed.exists()
    finally:  # never leave the marker behind for other tests' processes
        failed.unlink(missing_ok=True)
    assert result.returncode == 0, result.stderr
    assert f"CPU kernel ready in {kernels.build_directory('cpu')}" in result.stderr
    assert kernels.load("cpu") is not None
