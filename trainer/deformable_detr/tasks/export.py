"""`deformable-detr export`: a checkpoint to an ONNX file (TensorRT plugin node, or plain ops with on_cpu).

Every field of TAO's `export` table: checkpoint, onnx_file, on_cpu, input_channel,
input_width, input_height, opset_version, batch_size (-1 = dynamic), verbose, gpu_id,
results_dir, and TAO 6's format (onnx; xdl is refused in one line) and serialize_nvdsinfer
(DeepStream's nvinfer config and labels file beside the ONNX file, export/nvdsinfer.py).
The file is checked with `onnx.checker` (full check) before it replaces any existing file of
that name.
"""
from __future__ import annotations

import os

import torch

from ..config.schema import ExperimentConfig
from ..errors import UsageError
from ..export.onnx_export import PLUGIN_OP, check_opset, export_to_bytes
from ..runtime import storage
from ..runtime.logging import get_logger
from ..runtime.paths import task_results_dir
from .loading import load_model_for_inference
from .results_folder import check_writable, results_dir_field, results_recorded

log = get_logger("export")


def onnx_path(spec: ExperimentConfig) -> str:
    """export.onnx_file, else `<results_dir>/export/<checkpoint name>.onnx`."""
    if spec.export.onnx_file:
        return spec.export.onnx_file
    stem = os.path.splitext(os.path.basename(spec.export.checkpoint.rstrip("/")))[0]
    return storage.join(task_results_dir(spec, "export"), f"{stem}.onnx")


def _device(spec: ExperimentConfig) -> torch.device:
    # TAO traces the plugin graph on the GPU; the graph is the same on the CPU, which is used without one.
    if not spec.export.on_cpu and torch.cuda.is_available():
        if spec.export.gpu_id >= torch.cuda.device_count():
            raise UsageError(f"export.gpu_id: {spec.export.gpu_id}; accepted: 0..{torch.cuda.device_count() - 1}")
        return torch.device("cuda", spec.export.gpu_id)
    return torch.device("cpu")


def run(spec: ExperimentConfig) -> int:
    export = spec.export
    if not export.checkpoint:
        raise UsageError("export.checkpoint: not set; give the model checkpoint (.pth) to export, "
                         "e.g. export.checkpoint=model.pth")
    if export.format != "onnx":
        raise UsageError(f"export.format: {export.format} is not written by deformable-detr; accepted: onnx")
    check_opset(export.opset_version)
    if export.batch_size == 0:
        raise UsageError("export.batch_size: 0; accepted: -1 (dynamic) or a positive batch size")
    target = onnx_path(spec)
    # Before the minutes of loading and tracing: a place the ONNX file cannot be written is one line now.
    field = "export.onnx_file" if export.onnx_file else results_dir_field(spec, "export")
    check_writable(os.path.dirname(target) or ".", field)

    model, _postprocessor = load_model_for_inference(spec, export.checkpoint, spec.encryption_key, _device(spec))
    mode = "plain ONNX ops" if export.on_cpu else f"{PLUGIN_OP} nodes"
    log.info("exporting %s (%dx%dx%d, batch %s, opset %d, attention as %s)", export.checkpoint,
             export.input_channel, export.input_height, export.input_width,
             "dynamic" if export.batch_size == -1 else export.batch_size, export.opset_version, mode)
    data = export_to_bytes(model, batch_size=export.batch_size, channels=export.input_channel,
                           height=export.input_height, width=export.input_width, opset=export.opset_version,
                           plugin=not export.on_cpu, verbose=export.verbose)
    with results_recorded(spec, "export"):  # the files and experiment.yaml, both or neither
        storage.write_bytes(target, data)
        log.info("wrote %s (%.1f MB)", target, len(data) / 1e6)
        if export.serialize_nvdsinfer:
            from ..export.nvdsinfer import write_deepstream_files

            log.info("wrote the DeepStream nvinfer config and labels: %s",
                     ", ".join(write_deepstream_files(spec, target)))
    return 0
