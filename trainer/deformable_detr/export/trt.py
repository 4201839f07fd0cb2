"""Run a TensorRT engine built by `gen_trt_engine` as evaluate/inference run the PyTorch model, and the
builder settings gen_trt_engine applies (`configure_builder`, at the end).

`TrtDetector(images, masks)` returns {"pred_logits", "pred_boxes"} like the model, so the
tasks' postprocessor and output code are shared. The engine sees whole, unpadded images:
the data pipeline resizes every image to the engine's input size (`engine_transform`) and
the boxes, normalised to that image, map back to the original image unchanged.

Plugins: TensorRT's own plugin library (which has `MultiscaleDeformableAttnPlugin_TRT`)
is registered; set `DDETR_TRT_PLUGIN_LIB` to the path of an extra plugin library (.so) to
load it first, e.g. one built from TAO's TensorRT OSS fork.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import torch

from ..config.schema import AugmentationConfig, ExperimentConfig
from ..data.transforms import Transform, build_fixed_size_transform
from ..errors import UsageError
from ..runtime import storage
from ..runtime.logging import get_logger
from .onnx_export import INPUT_NAMES, OUTPUT_NAMES

log = get_logger("trt")

PLUGIN_LIB_ENV = "DDETR_TRT_PLUGIN_LIB"


def _tensorrt_import_error() -> Optional[str]:
    """None when `import tensorrt` works, else why not (not installed, or its libraries fail to load)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        if getattr(err, "name", None) == "tensorrt":
            return "the tensorrt package is not installed (pip install './trainer[tensorrt]' in the repository)"
        return f"the tensorrt package does not import ({err})"
    except OSError as err:  # a shared library of TensorRT or CUDA is missing
        return f"the tensorrt package does not import ({err})"
    return None


def unavailable_reasons(tensorrt_error: Optional[str], cuda_available: bool) -> list[str]:
    """What keeps an engine from running here: the tensorrt import problem and/or no GPU."""
    reasons = [tensorrt_error] if tensorrt_error else []
    if not cuda_available:
        reasons.append("no CUDA GPU is visible")
    return reasons


def missing_requirements() -> list[str]:
    return unavailable_reasons(_tensorrt_import_error(), torch.cuda.is_available())


@dataclasses.dataclass(frozen=True)
class EngineIO:
    """What the tasks need to know of an engine: its input and the batch/size range of profile 0."""

    input_name: str
    input_dtype: torch.dtype
    min_shape: tuple[int, ...]  # [B, C, H, W] lower bound of the optimisation profile
    max_shape: tuple[int, ...]
    output_names: tuple[str, ...]

    @property
    def batch_range(self) -> tuple[int, int]:
        return self.min_shape[0], self.max_shape[0]


def resolve_input_size(width: Optional[int], height: Optional[int], io: EngineIO, task: str) -> tuple[int, int]:
    """(height, width) the images are resized to: `{task}.input_height/width` when set, else the engine's.

    A set value must lie in the engine's profile; a dynamic engine dimension must be set.
    """
    size = []
    for name, value, axis in (("input_height", height, 2), ("input_width", width, 3)):
        low, high = io.min_shape[axis], io.max_shape[axis]
        if value is None:
            if low != high:
                raise UsageError(f"{task}.{name}: not set, and the engine accepts {low}..{high}; give the size to run")
            value = low
        elif not low <= value <= high:
            accepted = str(low) if low == high else f"{low}..{high}"
            raise UsageError(f"{task}.{name}: {value}, but the engine was built for {accepted}; "
                             f"accepted: {accepted} (or leave it unset to use the engine's size)")
        size.append(value)
    return size[0], size[1]


def batch_chunks(batch: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """(start, stop, run_batch) per engine call: at most `max_batch` images each, a short chunk
    padded up to `min_batch` (for a fixed-batch engine min == max)."""
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"engine batch range {min_batch}..{max_batch}")
    chunks = []
    for start in range(0, batch, max_batch):
        stop = min(start + max_batch, batch)
        chunks.append((start, stop, max(stop - start, min_batch)))
    return chunks


def run_in_chunks(images: torch.Tensor, min_batch: int, max_batch: int,
                  run: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{pred_logits, pred_boxes} (float32) of `images` from `run` called on batches of min..max images.

    A short chunk is padded with blank images and their outputs dropped.
    """
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in OUTPUT_NAMES}
    for start, stop, run_batch in batch_chunks(len(images), min_batch, max_batch):
        chunk = images[start:stop]
        if run_batch > len(chunk):
            chunk = torch.cat([chunk, chunk.new_zeros((run_batch - len(chunk), *chunk.shape[1:]))])
        outputs = run(chunk)
        for name in OUTPUT_NAMES:
            pieces[name].append(outputs[name][: stop - start].float())
    return {name: torch.cat(parts) for name, parts in pieces.items()}


def engine_transform(aug: AugmentationConfig, height: int, width: int) -> Transform:
    """Resize to exactly (height, width), as TAO's TensorRT inferencer does (aspect not kept)."""
    return build_fixed_size_transform(aug, height, width)


def load_plugins(logger: Any) -> None:
    """Load `DDETR_TRT_PLUGIN_LIB` (if set), then register TensorRT's standard plugins."""
    extra = os.environ.get(PLUGIN_LIB_ENV)
    if extra:
        if not os.path.isfile(extra):
            raise UsageError(f"{PLUGIN_LIB_ENV}: {extra} does not exist; give the path of a TensorRT plugin .so")
        try:
            ctypes.CDLL(extra, mode=ctypes.RTLD_GLOBAL)  # its static initialisers register its plugins
        except OSError as err:
            raise UsageError(f"{PLUGIN_LIB_ENV}: {extra} does not load: {err}") from None
    import tensorrt as trt

    trt.init_libnvinfer_plugins(logger, "")


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    import tensorrt as trt

    known = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    if trt_dtype not in known:
        raise UsageError(f"TensorRT engine: tensor type {trt_dtype} is not supported; accepted: float32/float16")
    return known[trt_dtype]


def describe_engine(engine: Any, source: str) -> EngineIO:
    import tensorrt as trt

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    if len(inputs) != 1 or not set(OUTPUT_NAMES) <= set(outputs):
        raise UsageError(f"{source}: the engine has inputs {inputs} and outputs {list(outputs)}; expected one "
                         f"input ({INPUT_NAMES[0]}) and outputs {OUTPUT_NAMES} (build it from `export`'s ONNX file)")
    minimum, _opt, maximum = engine.get_tensor_profile_shape(inputs[0], 0)
    return EngineIO(inputs[0], _torch_dtype(engine.get_tensor_dtype(inputs[0])), tuple(minimum), tuple(maximum),
                    outputs)


class TrtDetector:
    """A deserialised engine on one CUDA device, called like the model: (images, masks) -> outputs."""

    def __init__(self, engine_file: str, device: torch.device | str, field: str = "trt_engine") -> None:
        import tensorrt as trt

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UsageError(f"{field}: a TensorRT engine runs on a CUDA device, not {self.device}")
        if not storage.exists(engine_file):
            raise UsageError(f"{field}: {engine_file} does not exist; build one with gen_trt_engine")
        torch.cuda.set_device(self.device)  # TensorRT allocates on the current device
        self.logger = trt.Logger(trt.Logger.WARNING)
        load_plugins(self.logger)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(storage.read_bytes(engine_file))
        if self.engine is None:
            raise UsageError(f"{field}: {engine_file} is not a TensorRT engine for this TensorRT version and GPU "
                             f"(or a plugin it uses is not registered; see {PLUGIN_LIB_ENV})")
        self.io = describe_engine(self.engine, engine_file)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.output_dtypes = {name: _torch_dtype(self.engine.get_tensor_dtype(name)) for name in self.io.output_names}

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One engine call on a batch the profile accepts."""
        images = images.to(self.device, self.io.input_dtype).contiguous()
        self.context.set_input_shape(self.io.input_name, tuple(images.shape))
        self.context.set_tensor_address(self.io.input_name, images.data_ptr())
        outputs = {}
        for name in self.io.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.output_dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the input was written on the caller's stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT: execute_async_v3 failed (see the TensorRT log above)")
        caller.wait_stream(self.stream)
        for tensor in (images, *outputs.values()):
            tensor.record_stream(self.stream)
        return outputs

    def __call__(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """images [B, 3, H, W] at the engine's input size; masks are ignored (the images are unpadded)."""
        height, width = images.shape[-2:]
        low, high = self.io.min_shape, self.io.max_shape
        if not (low[2] <= height <= high[2] and low[3] <= width <= high[3]):
            raise UsageError(f"TensorRT engine: images of {height}x{width} but the engine takes "
                             f"{low[2]}..{high[2]} x {low[3]}..{high[3]} (height x width)")
        return run_in_chunks(images, *self.io.batch_range, self._run)


def without_fixed_padding(spec: ExperimentConfig) -> ExperimentConfig:
    """The spec with fixed_padding off: engine inputs are already all exactly the engine's size."""
    aug = dataclasses.replace(spec.dataset.augmentation, fixed_padding=False)
    return dataclasses.replace(spec, dataset=dataclasses.replace(spec.dataset, augmentation=aug))



# ----------------------------------------------------------------------------- building an engine
#
# gen_trt_engine's builder settings, as TAO Deploy applies them. The functions take the tensorrt
# module (`trt`) as an argument so that what they ask of TensorRT can be checked without it.

LAYER_PRECISIONS = ("fp32", "fp16", "int8", "int32")
LAYERS_PRECISION_FIELD = "gen_trt_engine.tensorrt.layers_precision"


def parse_layers_precision(entries: Sequence[str]) -> dict[str, str]:
    """`{layer name: precision}` from TAO's `name:precision` entries (the last `:` splits; `*` names
    every layer not named otherwise)."""
    precisions: dict[str, str] = {}
    for index, entry in enumerate(entries):
        name, sep, precision = entry.rpartition(":")
        if not sep or not name or precision.lower() not in LAYER_PRECISIONS:
            raise UsageError(f"{LAYERS_PRECISION_FIELD}[{index}]: {entry!r}; accepted: layer_name:precision with "
                             f"precision one of {', '.join(LAYER_PRECISIONS)} (layer_name * = every other layer)")
        precisions[name] = precision.lower()
    return precisions


def _trt_type(trt: Any, precision: str) -> Any:
    return {"fp32": trt.float32, "fp16": trt.float16, "int8": trt.int8, "int32": trt.int32}[precision]


def _keeps_own_type(trt: Any, layer: Any) -> bool:
    """Layers the `*` default leaves alone: integer or boolean ones, constants, shape computations."""
    if layer.precision in (trt.int32, trt.bool) or layer.type == trt.LayerType.CONSTANT:
        return True
    if layer.num_inputs >= 1:
        first = layer.get_input(0)
        if first is not None and (getattr(first, "is_shape_tensor", False) or (
                first.dtype == trt.int32 and layer.num_outputs >= 1 and layer.get_output(0).dtype == trt.int32)):
            return True
    return False


def apply_layer_precisions(trt: Any, network: Any, precisions: dict[str, str]) -> list[str]:
    """Set each named layer's precision (and `*`'s on the others it suits); returns the layers set.
    A name that matches no layer of the network is an error naming it."""
    default = precisions.get("*")
    names = {network.get_layer(i).name for i in range(network.num_layers)}
    unknown = sorted(set(precisions) - names - {"*"})
    if unknown:
        raise UsageError(f"{LAYERS_PRECISION_FIELD}: no layer named {', '.join(map(repr, unknown))} in the ONNX "
                         "network (names are the ONNX node names, e.g. /backbone/conv1/Conv)")
    changed = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        precision = precisions.get(layer.name)
        if precision is None and (default is None or _keeps_own_type(trt, layer)):
            continue
        layer.precision = _trt_type(trt, precision or default)
        changed.append(layer.name)
    return changed


def int8_calibration_problem(section: Any) -> Optional[str]:
    """Why an INT8 build cannot calibrate (None when it can): it needs an existing cache or images."""
    calibration = section.tensorrt.calibration
    if calibration.cal_cache_file and storage.exists(calibration.cal_cache_file):
        return None
    if not calibration.cal_image_dir:
        return ("gen_trt_engine.tensorrt.calibration.cal_image_dir: not set, and no cal_cache_file to read; "
                "an INT8 engine needs calibration images (or the cache of an earlier calibration)")
    if not calibration.cal_cache_file:
        return ("gen_trt_engine.tensorrt.calibration.cal_cache_file: not set; give the file the INT8 "
                "calibration is written to (and read from next time)")
    return None


def calibration_images(folders: Sequence[str], limit: int) -> list[str]:
    from ..data.inference import list_images

    return list_images(list(folders))[:limit]


def make_calibrator(trt: Any, section: Any, aug: AugmentationConfig, device: torch.device | str = "cuda") -> Any:
    """TensorRT's entropy calibrator over `cal_batches` batches of `cal_batch_size` images of
    cal_image_dir (resized to the engine's input size and normalised as inference does); the cache
    is read from / written to cal_cache_file."""
    from torchvision import tv_tensors

    from ..data.images import load_image

    calibration = section.tensorrt.calibration
    batch, batches = calibration.cal_batch_size, calibration.cal_batches
    height, width = section.input_height, section.input_width
    transform = engine_transform(aug, height, width)

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.paths = calibration_images(calibration.cal_image_dir, batch * batches) \
                if calibration.cal_image_dir else []
            self.next = 0
            self.current: Optional[torch.Tensor] = None

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names):  # noqa: ARG002 - TensorRT's signature
            if self.next + batch > len(self.paths):
                return None
            images = []
            for path in self.paths[self.next:self.next + batch]:
                image = load_image(path)
                no_boxes = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY",
                                                              canvas_size=tuple(image.shape[-2:])),
                            "labels": torch.zeros(0, dtype=torch.int64)}
                image, _ = transform(image, no_boxes)
                images.append(image.as_subclass(torch.Tensor))
            self.next += batch
            self.current = torch.stack(images).to(device, torch.float32).contiguous()
            return [int(self.current.data_ptr())]

        def read_calibration_cache(self):
            path = calibration.cal_cache_file
            return storage.read_bytes(path) if path and storage.exists(path) else None

        def write_calibration_cache(self, cache) -> None:
            storage.write_bytes(calibration.cal_cache_file, bytes(cache))

    return Calibrator()


def configure_builder(trt: Any, builder: Any, network: Any, config: Any, section: Any,
                      aug: Optional[AugmentationConfig] = None) -> Optional[Any]:
    """Apply gen_trt_engine's settings to a builder config: workspace, precision (FP16 / INT8 with a
    calibrator), per-layer precisions, timing cache. Returns the timing cache to save after the build
    (`save_timing_cache`), or None."""
    tensorrt = section.tensorrt
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, tensorrt.workspace_size << 20)
    precisions = parse_layers_precision(tensorrt.layers_precision)
    used = {tensorrt.data_type, *precisions.values()}
    if "fp16" in used:
        config.set_flag(trt.BuilderFlag.FP16)
    if "int8" in used:
        problem = int8_calibration_problem(section)
        if problem:
            raise UsageError(problem)
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = make_calibrator(trt, section, aug or AugmentationConfig())
    if precisions:
        changed = apply_layer_precisions(trt, network, precisions)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("%s: precision set on %d layer(s)", LAYERS_PRECISION_FIELD, len(changed))
    if not section.timing_cache:
        return None
    cache = config.create_timing_cache(b"")
    if storage.exists(section.timing_cache):
        log.info("gen_trt_engine.timing_cache: reading %s", section.timing_cache)
        cache.combine(config.create_timing_cache(storage.read_bytes(section.timing_cache)), False)
    config.set_timing_cache(cache, False)
    return cache


def save_timing_cache(config: Any, path: Optional[str]) -> None:
    """Write the builder config's timing cache (what this build measured, with what it read) to `path`."""
    if path:
        storage.write_bytes(path, bytes(config.get_timing_cache().serialize()))
