"""Run a TensorRT engine built by `gen_trt_engine` as evaluate/inference run the PyTorch model.

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
from typing import Any, Callable, Optional

import torch

from ..config.schema import AugmentationConfig, ExperimentConfig
from ..data.transforms import Compose, Normalize, resize
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


class ResizeTo:
    """Resize to exactly (height, width), as TAO's TensorRT inferencer does (aspect not kept)."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def __call__(self, image, target):
        return resize(image, target, self.height, self.width)


def engine_transform(aug: AugmentationConfig, height: int, width: int) -> Compose:
    return Compose([ResizeTo(height, width), Normalize(aug.input_mean, aug.input_std)])


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

