"""The CUDA kernel: the whole extension (kernels, bindings with CUDA on, linked against torch's
CUDA libraries) built with nvcc for sm_80 and sm_90 and imported on every run (no GPU needed),
and checked against the reference where a GPU is present.

Without /usr/local/cuda, the toolkit comes from PyPI's nvcc wheels, assembled by
scripts/test-deps.d/cuda-nvcc.sh (run by `scripts/install.sh test`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from deformable_detr.ops import kernels
from deformable_detr.ops.reference import ms_deform_attn_reference

from test_msda import RANDOM_CASES, REALISTIC_SHAPES, make_inputs, outputs_and_grads

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


NO_TOOLKIT = ("no CUDA toolkit: no CUDA_HOME, /usr/local/cuda or nvcc on PATH, and the PyPI one "
              f"({kernels.pypi_cuda_home()}) is not assembled: run bash scripts/test-deps.d/cuda-nvcc.sh")
needs_toolkit = pytest.mark.skipif(kernels.find_cuda_home() is None or torch.version.cuda is None,
                                   reason=NO_TOOLKIT if torch.version.cuda else "this torch has no CUDA")

# Runs in a fresh process: the build and the import must not depend on this process's state.
BUILD_AND_IMPORT = """
import json, sys, time
import torch
from deformable_detr.ops import kernels
start = time.monotonic()
module = kernels.build("cuda")
seconds = time.monotonic() - start
library = kernels.build_directory("cuda") / (kernels.extension_name("cuda") + ".so")
print(json.dumps({"seconds": seconds, "library": str(library), "functions": sorted(
    name for name in ("forward", "backward") if callable(getattr(module, name, None))),
    "doc": module.forward.__doc__}))
"""


@needs_toolkit
@pytest.mark.slow
def test_cuda_extension_builds_links_and_imports_for_sm80_and_sm90(tmp_path):
    """The whole CUDA extension (msda_cuda.cu and the bindings compiled with MSDA_WITH_CUDA,
    linked into a shared library) for sm_80 and sm_90, then imported. The import needs no GPU:
    it only loads the library and torch's CUDA libraries (the torch wheel ships libcudart); the
    kernels would first touch the device when called. Several minutes on a busy 2-core machine."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), TORCH_CUDA_ARCH_LIST="8.0;9.0",
               CUDA_HOME=str(kernels.find_cuda_home()), MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("DDETR_MSDA_BUILD_WAIT_S", None)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", BUILD_AND_IMPORT], env=env, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["functions"] == ["backward", "forward"]
    assert "CUDA" in report["doc"]  # the bindings were compiled with CUDA on, not the CPU ones
    library = report["library"]
    assert os.path.getsize(library) > 0
    # Device code for both archs is in the library (cuobjdump lists the cubins' sm_XX).
    cuobjdump = kernels.find_cuda_home() / "bin" / "cuobjdump"
    if cuobjdump.exists():
        listing = subprocess.run([str(cuobjdump), "--list-elf", library], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing
    print(f"CUDA extension built for sm_80+sm_90 and imported in {report['seconds']:.0f} s "
          f"({time.monotonic() - start:.0f} s with the interpreter start)")


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
