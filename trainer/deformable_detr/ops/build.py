"""Prebuild the compiled kernels of multi-scale deformable attention into the extension cache.

    python -m deformable_detr.ops.build                 # the CPU kernel, and the CUDA one where nvcc is
    python -m deformable_detr.ops.build --kind cuda     # TORCH_CUDA_ARCH_LIST picks the GPU archs
    python -m deformable_detr.ops.build --check-cuda 8.0 9.0   # only compile the CUDA sources (no GPU)

Kernels are otherwise built on first use; this command moves that cost to install time (a
Docker build, a CI setup step) and retries a build that failed before.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..runtime.logging import get_logger, setup_logging
from . import kernels

log = get_logger("ops.build")


def _clear_failure(kind: str) -> None:
    (kernels.build_directory(kind) / "FAILED").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deformable_detr.ops.build", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["cpu", "cuda", "all"], default=None,
                        help="which kernel to build (default: cpu, plus cuda when a CUDA toolkit is found "
                             "and a GPU or TORCH_CUDA_ARCH_LIST gives the archs)")
    parser.add_argument("--check-cuda", nargs="+", metavar="ARCH",
                        help="only compile the CUDA sources with nvcc for these compute capabilities")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    setup_logging()
    cuda_home = kernels.find_cuda_home()
    if cuda_home is not None and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = str(cuda_home)  # read by torch.utils.cpp_extension on import

    if args.check_cuda:
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                kernels.compile_cuda_objects(args.check_cuda, Path(out_dir))
            except kernels.KernelUnavailable as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
        log.info("CUDA sources compile for %s (%.0f s)", ", ".join(args.check_cuda), time.monotonic() - start)
        return 0

    cuda_targets = torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    kinds = ["cpu", "cuda"] if args.kind == "all" else [args.kind] if args.kind else \
        ["cpu"] + (["cuda"] if cuda_home is not None and cuda_targets else [])
    failed = False
    for kind in kinds:
        _clear_failure(kind)
        try:
            kernels.build(kind, verbose=args.verbose)
            log.info("%s kernel ready in %s", kind.upper(), kernels.build_directory(kind))
        except kernels.KernelUnavailable as error:
            print(f"error: {kind} kernel: {error}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
