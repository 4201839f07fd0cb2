"""What evaluate, inference, export and training's validation share: a model from a
checkpoint, predictions over a data loader, and the multi-process relaunch."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Iterable, Iterator, Optional

import torch

from .. import exit_codes
from ..config.loader import dump_spec
from ..config.schema import ExperimentConfig
from ..errors import UsageError
from ..runtime import distributed
from ..runtime.logging import get_logger
from ..runtime.progress import progress

log = get_logger("tasks")


class FeatureUnavailable(UsageError):
    """Something this machine cannot do (a TensorRT engine without tensorrt or a GPU): exit code 3."""

    exit_code = exit_codes.UNAVAILABLE_FEATURE.code


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
    """(TrtDetector on `device`, postprocessor, (height, width) to resize the images to) for `{task}.trt_engine`.

    The size is `{task}.input_height/input_width` when set, else the engine's own input size.
    """
    from ..export.trt import TrtDetector, resolve_input_size
    from ..model.postprocess import PostProcess

    require_tensorrt(field)
    task = field.split(".")[0]
    detector = TrtDetector(getattr(getattr(spec, task), "trt_engine"), device, field)
    size = resolve_input_size(input_width, input_height, detector.io, task)
    return detector, PostProcess(spec.model.num_select), size


def require_checkpoint(path: Optional[str], field: str) -> str:
    if not path:
        raise UsageError(f"{field}: not set; give the model checkpoint (.pth) to run, e.g. {field}=model.pth")
    return path


def load_model_for_inference(spec: ExperimentConfig, checkpoint_path: str, key: Optional[str] = None,
                             device: torch.device | str = "cpu"):
    """(model in eval mode on `device`, postprocessor) from any checkpoint load_model_state accepts.

    Accepted: our training checkpoints, original Deformable-DETR `{"model": ...}` files and
    TAO Lightning `{"state_dict": ...}` files, encrypted ones with `key`.
    """
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


def check_resume(spec: ExperimentConfig, state: dict, path: str) -> None:
    """Before resuming from `state` (a training checkpoint read from `path`): the same network, and epochs left.

    A checkpoint already past train.num_epochs would make the run a silent no-op, so it is refused.
    """
    from ..model.checkpoint_compat import check_architecture

    try:
        check_architecture(state, spec.model)
    except UsageError as err:
        raise UsageError(f"train.resume_training_checkpoint_path: {path}: {err}") from None
    epoch = int(state.get("epoch", 0)) + 1  # 1-based: the epoch the checkpoint was taken in
    if spec.train.num_epochs < epoch:
        raise UsageError(f"train.num_epochs: {spec.train.num_epochs} is below the epoch of the checkpoint to resume "
                         f"({path}: epoch {epoch}); set train.num_epochs to {epoch} or more to continue it, "
                         "or train into another results folder")
    if spec.train.num_epochs == epoch and state.get("epoch_finished", True):
        log.info("%s finished epoch %d of %d: training is already complete", path, epoch, spec.train.num_epochs)


def _target_sizes(targets: list[dict]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(t["orig_size"], dtype=torch.int64) for t in targets])


def predict_batches(model, postprocessor, dataloader: Iterable, device: torch.device | str,
                    desc: str = "predict", show_progress: bool = True,
                    total: Optional[int] = None) -> Iterator[tuple[dict, dict]]:
    """(target, detections) per image: detections {scores, labels, boxes} in original-image xyxy pixels."""
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)
    with torch.inference_mode():
        for images, masks, targets in progress(dataloader, total=total, desc=desc, enabled=show_progress):
            outputs = model(images.to(device, non_blocking=True), masks.to(device, non_blocking=True))
            detections = postprocessor(outputs, _target_sizes(targets).to(device))
            for target, found in zip(targets, detections):
                yield target, {name: value.detach().cpu() for name, value in found.items()}


def to_coco_results(image_id: int, detections: dict, conf_threshold: float = 0.0) -> list[dict]:
    """COCO results (bbox x, y, w, h) of one image, dropping scores below `conf_threshold`."""
    keep = detections["scores"] >= conf_threshold
    results = []
    for score, label, box in zip(detections["scores"][keep].tolist(), detections["labels"][keep].tolist(),
                                 detections["boxes"][keep].tolist()):
        x1, y1, x2, y2 = box
        results.append({"image_id": int(image_id), "category_id": int(label),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return results


def predict(model, postprocessor, dataloader: Iterable, device: torch.device | str,
            conf_threshold: float = 0.0, show_progress: bool = True) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox xywh, score) for every image of `dataloader`."""
    results: list[dict] = []
    for target, detections in predict_batches(model, postprocessor, dataloader, device, "predict", show_progress):
        results.extend(to_coco_results(int(torch.as_tensor(target["image_id"]).item()), detections, conf_threshold))
    return results


def relaunch_in_workers(spec: ExperimentConfig, task: str, num_gpus: int, num_nodes: int = 1) -> Optional[int]:
    """Run `task` in `num_gpus` torchrun workers and return their exit code; None = work in this process.

    The workers read the effective spec from a temporary file; the key goes on their
    command line (as -k), never into a file.
    """
    if distributed.under_torchrun() or (num_gpus <= 1 and num_nodes <= 1):
        return None
    with tempfile.TemporaryDirectory(prefix=f"ddetr-{task}-") as folder:
        spec_path = os.path.join(folder, "spec.yaml")
        with open(spec_path, "w", encoding="utf-8") as fh:
            fh.write(dump_spec(dataclasses.replace(spec, encryption_key=None)))
        argv = [task, "-e", spec_path] + (["-k", spec.encryption_key] if spec.encryption_key else [])
        return distributed.launch_if_needed(argv, num_gpus=num_gpus, num_nodes=num_nodes)
