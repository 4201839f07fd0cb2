"""The CUDA kernel: compiled with nvcc for sm_80 and sm_90 on every run (no GPU needed), and
checked against the reference where a GPU is present."""
from __future__ import annotations

import pytest
import torch

from deformable_detr.ops import kernels
from deformable_detr.ops.reference import ms_deform_attn_reference

from test_msda import RANDOM_CASES, REALISTIC_SHAPES, make_inputs, outputs_and_grads

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.skipif(kernels.find_cuda_home() is None, reason="no CUDA toolkit (nvcc) here")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    """Keeps a kernel that does not compile from landing; about 1-2 minutes."""
    objects = kernels.compile_cuda_objects(["8.0", "9.0"], tmp_path)
    assert objects and all(path.stat().st_size > 0 for path in objects)


@pytest.fixture(scope="module")
def cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    return kernels.load("cuda")


def run_cuda(extension, *inputs):
    return kernels.run_kernel(extension, *inputs)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(RANDOM_CASES)))
def test_cuda_kernel_gradcheck_float64(cuda_kernel, case):
    shapes, batch, heads, channels, queries, points = RANDOM_CASES[case]
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        shapes, batch, heads, channels, queries, points, torch.float64, seed=case, device="cuda")
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: run_cuda(cuda_kernel, v, spatial_shapes, level_start_index, loc, w),
        inputs, eps=1e-6, atol=1e-5)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,channels,tolerance", [
    (torch.float32, 32, 1e-4), (torch.float32, 6, 1e-4),  # 6 channels: the unvectorised path
    (torch.float16, 32, 1e-2), (torch.bfloat16, 32, 5e-2), (torch.float16, 12, 1e-2)])
def test_cuda_kernel_matches_reference(cuda_kernel, dtype, channels, tolerance):
    inputs = make_inputs(REALISTIC_SHAPES, 2, 8, channels, 300, 4, dtype, seed=4, margin=0.05, device="cuda")
    ours = outputs_and_grads(lambda *a: run_cuda(cuda_kernel, *a), inputs)
    truth = outputs_and_grads(lambda v, s, i, loc, w: ms_deform_attn_reference(v, s, loc, w),
                              [t.double() if t.is_floating_point() else t for t in inputs])
    for name, ours_t, truth_t in zip(["output", "grad value", "grad locations", "grad weights"], ours, truth):
        assert ours_t.dtype == dtype, name
        error = (ours_t.double() - truth_t).abs().max().item()
        assert error <= tolerance * max(truth_t.abs().max().item(), 1.0), name
