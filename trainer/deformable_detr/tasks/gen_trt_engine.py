"""`deformable-detr gen_trt_engine`: a TensorRT engine (fp32/fp16/int8) from an exported ONNX file.

TAO's builder settings (export/trt.py `configure_builder`): tensorrt.data_type, INT8 calibrated
from tensorrt.calibration (cal_image_dir, cal_batches x cal_batch_size images; cal_cache_file
read when it exists, written after calibrating), tensorrt.layers_precision (`layer:precision`,
`*` for the other layers), timing_cache (read when it exists, written after the build).

Needs the `tensorrt` package (`pip install './trainer[tensorrt]'`) and a CUDA GPU; without
them it says so in one line, exits 3 and writes nothing. The deformable-attention nodes resolve to
TensorRT's `MultiscaleDeformableAttnPlugin_TRT` from its standard plugin library.
"""
from __future__ import annotations

import os

import torch

from ..config.schema import ExperimentConfig
from ..errors import FeatureUnavailable, UsageError
from ..export.trt import (configure_builder, int8_calibration_problem, missing_requirements,
                          parse_layers_precision, save_timing_cache)
from ..runtime import storage
from ..runtime.logging import get_logger
from ..runtime.paths import task_results_dir
from .results_folder import results_recorded

log = get_logger("gen_trt_engine")


def engine_path(spec: ExperimentConfig) -> str:
    section = spec.gen_trt_engine
    if section.trt_engine:
        return section.trt_engine
    stem = os.path.splitext(os.path.basename(section.onnx_file.rstrip("/")))[0]
    return storage.join(task_results_dir(spec, "gen_trt_engine"), f"{stem}.engine")


def _profile_shapes(spec: ExperimentConfig, fixed_batch: int | None):
    """(min, opt, max) input shapes of the optimisation profile."""
    section, trt_section = spec.gen_trt_engine, spec.gen_trt_engine.tensorrt
    dims = (section.input_channel, section.input_height, section.input_width)
    if fixed_batch is not None:
        return ((fixed_batch, *dims),) * 3
    batches = (trt_section.min_batch_size, trt_section.opt_batch_size, trt_section.max_batch_size)
    if not batches[0] <= batches[1] <= batches[2]:
        raise UsageError(f"gen_trt_engine.tensorrt: min/opt/max_batch_size {batches}; accepted: min <= opt <= max")
    return tuple((b, *dims) for b in batches)


def build_engine(spec: ExperimentConfig, onnx_bytes: bytes) -> bytes:
    import tensorrt as trt

    section = spec.gen_trt_engine
    logger = trt.Logger(trt.Logger.VERBOSE if section.verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # registers MultiscaleDeformableAttnPlugin_TRT
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UsageError(f"gen_trt_engine.onnx_file: {section.onnx_file} cannot be parsed by TensorRT: {errors}")
    config = builder.create_builder_config()
    configure_builder(trt, builder, network, config, section, spec.dataset.augmentation)
    image = network.get_input(0)
    batch = image.shape[0]
    profile = builder.create_optimization_profile()
    minimum, optimum, maximum = _profile_shapes(spec, None if batch == -1 else int(batch))
    profile.set_shape(image.name, minimum, optimum, maximum)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UsageError(f"gen_trt_engine: TensorRT could not build an engine from {section.onnx_file} "
                         "(run with gen_trt_engine.verbose=true for its log)")
    save_timing_cache(config, section.timing_cache)
    return bytes(engine)


def run(spec: ExperimentConfig) -> int:
    section = spec.gen_trt_engine
    if not section.onnx_file:
        raise UsageError("gen_trt_engine.onnx_file: not set; give the ONNX file written by the export task")
    if not storage.exists(section.onnx_file):
        raise UsageError(f"gen_trt_engine.onnx_file: {section.onnx_file} does not exist")
    # Settings TensorRT is not needed to check: refused first, in one line.
    precisions = parse_layers_precision(section.tensorrt.layers_precision)
    if "int8" in {section.tensorrt.data_type, *precisions.values()}:
        problem = int8_calibration_problem(section)
        if problem:
            raise UsageError(problem)
    missing = missing_requirements()
    if missing:
        raise FeatureUnavailable(f"a TensorRT engine cannot be built here: {'; '.join(missing)}")
    if section.gpu_id >= torch.cuda.device_count():
        raise UsageError(f"gen_trt_engine.gpu_id: {section.gpu_id}; accepted: 0..{torch.cuda.device_count() - 1}")
    torch.cuda.set_device(section.gpu_id)  # TensorRT builds on the current CUDA device
    target = engine_path(spec)
    log.info("building a %s TensorRT engine from %s", section.tensorrt.data_type, section.onnx_file)
    engine = build_engine(spec, storage.read_bytes(section.onnx_file))
    with results_recorded(spec, "gen_trt_engine"):  # the engine and experiment.yaml, both or neither
        storage.write_bytes(target, engine)
    log.info("wrote %s (%.1f MB)", target, len(engine) / 1e6)
    return 0
