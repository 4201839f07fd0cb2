"""The model evaluate, inference and export run: from a checkpoint (any format
`load_model_state` accepts, encrypted with a key or not) or from a TensorRT engine."""
from __future__ import annotations

from typing import Optional

import torch

from ..config.schema import ExperimentConfig
from ..errors import FeatureUnavailable, UsageError


def require_checkpoint(path: Optional[str], field: str) -> str:
    if not path:
        raise UsageError(f"{field}: not set; give the model checkpoint (.pth) to run, e.g. {field}=model.pth")
    return path


def load_model_for_inference(spec: ExperimentConfig, checkpoint_path: str, key: Optional[str] = None,
                             device: torch.device | str = "cpu"):
    """(model in eval mode on `device`, postprocessor): our training checkpoints, original
    Deformable-DETR `{"model": ...}` and TAO Lightning `{"state_dict": ...}` files."""
    from ..model import build_model
    from ..model.checkpoint_compat import load_model_state
    from ..runtime.checkpoint_io import load_object

    model, _criterion, postprocessor = build_model(spec)
    state = load_object(checkpoint_path, key)  # its errors name the path already
    try:
        load_model_state(model, state)
    except UsageError as err:
        raise UsageError(f"{checkpoint_path}: {err}") from None
    model.to(device).eval()
    return model, postprocessor


def require_tensorrt(field: str) -> None:
    """Refuse (exit 3, one line), naming `field` and what is missing, when an engine cannot run here."""
    from ..export.trt import missing_requirements

    missing = missing_requirements()
    if missing:
        task = field.split(".")[0]
        raise FeatureUnavailable(f"{field}: a TensorRT engine cannot run here: {'; '.join(missing)}; "
                                 f"set {task}.checkpoint instead to run the PyTorch model")


def load_engine_for_inference(spec: ExperimentConfig, field: str, device: torch.device | str,
                              input_width: Optional[int], input_height: Optional[int]):
    """(TrtDetector on `device`, postprocessor, (height, width) to resize the images to) for `{task}.trt_engine`;
    the size is `{task}.input_height/input_width` when set, else the engine's own input size."""
    from ..export.trt import TrtDetector, resolve_input_size
    from ..model.postprocess import PostProcess

    require_tensorrt(field)
    task = field.split(".")[0]
    detector = TrtDetector(getattr(getattr(spec, task), "trt_engine"), device, field)
    size = resolve_input_size(input_width, input_height, detector.io, task)
    return detector, PostProcess(spec.model.num_select), size
