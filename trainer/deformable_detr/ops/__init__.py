"""Multi-scale deformable attention behind one function.

`multi_scale_deformable_attention` is what the model calls. The implementation is chosen
here: the compiled kernel of the tensors' device (CPU with OpenMP, or CUDA), built on first
use and cached (see `kernels`), else the PyTorch reference; one log line per device says
which one runs. `DDETR_MSDA_IMPL=reference|cpu|cuda` forces one; a forced kernel that
cannot run raises a UsageError. Tracing and export always go through the reference, whose
standard ops every exporter understands.
"""
from __future__ import annotations

import os

import torch

from ..errors import UsageError
from ..runtime.logging import get_logger
from . import kernels
from .reference import ms_deform_attn_reference

log = get_logger("ops")

IMPL_ENV = "DDETR_MSDA_IMPL"
IMPLEMENTATIONS = ("reference", "cpu", "cuda")
_announced: set[tuple[str, str]] = set()


def forced_implementation() -> str | None:
    """The implementation forced by DDETR_MSDA_IMPL, or None to choose automatically."""
    forced = os.environ.get(IMPL_ENV, "").strip().lower()
    if not forced or forced == "auto":
        return None
    if forced not in IMPLEMENTATIONS:
        raise UsageError(f"{IMPL_ENV}={forced!r} is not an implementation; accepted: auto, "
                         + ", ".join(IMPLEMENTATIONS))
    return forced


def _announce(device: str, implementation: str, why: str = "") -> None:
    if (device, implementation) not in _announced:
        _announced.add((device, implementation))
        log.info("multi-scale deformable attention on %s: %s%s", device, implementation,
                 f" ({why})" if why else "")


def _is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def select_implementation(device: torch.device) -> str:
    """Which implementation runs for tensors on `device`: 'reference', 'cpu' or 'cuda'."""
    forced = forced_implementation()
    if forced == "reference" or _is_tracing():
        return "reference"
    kind = "cuda" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
    if forced is not None:
        if kind != forced:
            raise UsageError(f"{IMPL_ENV}={forced} but the tensors are on {device.type}; "
                             f"accepted here: reference" + (f", {kind}" if kind else ""))
        try:
            kernels.load(kind)
        except kernels.KernelUnavailable as error:
            raise UsageError(f"{IMPL_ENV}={forced}: the {forced} kernel is unavailable: {error}") from error
        return kind
    if kind is None:
        _announce(device.type, "PyTorch reference", f"no compiled kernel for {device.type}")
        return "reference"
    try:
        kernels.load(kind)
    except kernels.KernelUnavailable as error:
        _announce(device.type, "PyTorch reference", f"{kind} kernel unavailable: {error}")
        return "reference"
    _announce(device.type, f"compiled {kind} kernel")
    return kind


def multi_scale_deformable_attention(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                     level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                     attention_weights: torch.Tensor, im2col_step: int = 64) -> torch.Tensor:
    """Interface of the original `MSDeformAttnFunction`; returns [N, Lq, M*D].

    `im2col_step` is accepted for compatibility: these kernels sample straight from `value`
    and need no column buffer to batch.
    """
    implementation = select_implementation(value.device)
    if implementation == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    return kernels.run_kernel(kernels.load(implementation), value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights)


__all__ = ["multi_scale_deformable_attention", "ms_deform_attn_reference", "select_implementation",
           "forced_implementation", "IMPL_ENV"]
