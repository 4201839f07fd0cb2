"""Trace the detector to ONNX with deformable attention as plain ops or as TensorRT's plugin node.

`on_cpu` mode traces the PyTorch reference (GridSample and friends; opset 16+), which any ONNX
runtime executes. Plugin mode replaces each attention core by one
`MultiscaleDeformableAttnPlugin_TRT` node as NVIDIA TAO writes it: domain `nvidia`, string
attributes name / version "1" / namespace "", inputs (value [N, S, M, D], spatial_shapes int32
[L, 2], level_start_index int32 [L], sampling_locations [N, Lq, M, L, P, 2], attention_weights
[N, Lq, M, L, P]) and one output [N, Lq, M, D].
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from typing import Iterator, Tuple

import onnx
import torch
from torch import nn
from torch.onnx import symbolic_helper

from ..errors import UsageError
from ..model.attention import MSDeformAttn
from ..ops.reference import ms_deform_attn_reference

PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_DOMAIN = "nvidia"
PLUGIN_DOMAIN_VERSION = 1
INPUT_NAMES = ["inputs"]
OUTPUT_NAMES = ["pred_logits", "pred_boxes"]
# The TorchScript exporter writes these; GridSample (plain-op attention) needs 16.
MIN_OPSET, MAX_OPSET = 16, 20


class ExportedDetector(nn.Module):
    """images [B, 3, H, W] -> (pred_logits, pred_boxes): a full, unpadded image per batch entry."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        masks = torch.zeros_like(inputs[:, 0], dtype=torch.bool)
        outputs = self.model(inputs, masks)
        return outputs["pred_logits"], outputs["pred_boxes"]


class _PluginAttention(torch.autograd.Function):
    """Computes the reference in PyTorch; traces to one TensorRT plugin node."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        out = ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
        n, lq, _ = out.shape
        return out.view(n, lq, value.shape[2], value.shape[3])

    @staticmethod
    def symbolic(g, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        int32 = 6  # onnx.TensorProto.INT32; the plugin reads its shape inputs as int32
        shapes32 = g.op("Cast", spatial_shapes, to_i=int32)
        starts32 = g.op("Cast", level_start_index, to_i=int32)
        out = g.op(f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", value, shapes32, starts32, sampling_locations,
                   attention_weights, name_s=PLUGIN_OP, version_s="1", namespace_s="")
        # Declare the output [N, Lq, M, D] so that shape inference carries on past the custom node.
        value_sizes = symbolic_helper._get_tensor_sizes(value)
        location_sizes = symbolic_helper._get_tensor_sizes(sampling_locations)
        if value_sizes and location_sizes:
            out.setType(value.type().with_sizes([value_sizes[0], location_sizes[1], value_sizes[2], value_sizes[3]]))
        return out


def _plugin_core(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
    out = _PluginAttention.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return out.flatten(2)


def _plain_core(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Within the block every MSDeformAttn of `model` runs `plain` (reference ops) or `trt_plugin`."""
    cores = {"plain": _plain_core, "trt_plugin": _plugin_core}
    if mode not in cores:
        raise ValueError(f"attention mode {mode!r}; accepted: {', '.join(cores)}")
    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    saved = [m.core for m in modules]
    for module in modules:
        module.core = cores[mode]
    try:
        yield
    finally:
        for module, core in zip(modules, saved):
            module.core = core


def check_opset(opset: int, field: str = "export.opset_version") -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"{field}: {opset} cannot be written; accepted: {MIN_OPSET}..{MAX_OPSET} "
                         "(GridSample needs opset 16)")


def export_onnx(model: nn.Module, path: str, *, batch_size: int, channels: int, height: int, width: int,
                opset: int, plugin: bool, verbose: bool = False) -> onnx.ModelProto:
    """Trace `model` (eval mode) into an ONNX file at local `path`; returns the checked model.

    batch_size -1 makes the batch axis dynamic (named `batch`); a positive value fixes it. The
    query axis of the outputs is always static (model.num_queries).
    """
    check_opset(opset)
    wrapper = ExportedDetector(model).eval()
    sample = torch.randn(batch_size if batch_size > 0 else 1, channels, height, width,
                         device=next(model.parameters()).device)
    dynamic_axes = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES} if batch_size == -1 else None
    with attention_mode(model, "trt_plugin" if plugin else "plain"), torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings name Python branches on shapes; shapes other than the batch are fixed here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(wrapper, (sample,), path, dynamo=False, input_names=INPUT_NAMES,
                          output_names=OUTPUT_NAMES, opset_version=opset, dynamic_axes=dynamic_axes,
                          do_constant_folding=True, verbose=verbose,
                          custom_opsets={PLUGIN_DOMAIN: PLUGIN_DOMAIN_VERSION} if plugin else None)
    exported = onnx.load(path)
    _fix_output_shapes(exported, int(model.num_queries))
    onnx.save(exported, path)
    onnx.checker.check_model(exported, full_check=True)
    return exported


def _fix_output_shapes(exported: onnx.ModelProto, num_queries: int) -> None:
    """The query axis of both outputs is fixed by the model: write it as a number.

    The tracer leaves it symbolic under generated names (`Addpred_logits_dim_1`), which makes
    consumers (TensorRT profiles, onnxruntime bindings) treat it as dynamic. Only the batch
    axis stays dynamic, under the name `batch`.
    """
    for output in exported.graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) == 3:
            dims[1].Clear()
            dims[1].dim_value = num_queries


def export_to_bytes(model: nn.Module, **kwargs) -> bytes:
    """`export_onnx` into a private temporary folder; the caller writes the bytes atomically."""
    with tempfile.TemporaryDirectory(prefix="ddetr-export-") as folder:
        path = os.path.join(folder, "model.onnx")
        export_onnx(model, path, **kwargs)
        with open(path, "rb") as fh:
            return fh.read()
