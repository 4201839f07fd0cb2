"""`deformable-detr inference`: KITTI labels and annotated images for dataset.infer_data_sources.

For each image, in the task's results folder: `labels/<stem>.txt` (TAO's 16-field KITTI
lines, one per detection at or above inference.conf_threshold) and
`images_annotated/<name>` (the original image with boxes, inference.outline_width pixels
wide, class names and scores drawn in inference.color_map's colours). With
inference.is_internal the outputs go one folder deeper, under the name of each image's
folder. Unreadable images are reported and skipped. inference.batch_size images go through
the model at once (-1: dataset.batch_size). inference.gpu_ids picks the GPUs; with several
(inference.num_gpus) the images are sharded across torchrun workers.
With inference.trt_engine a TensorRT engine (export/trt.py) runs instead of the checkpoint.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..config.schema import ExperimentConfig
from ..data import InferenceImages, UnreadableImageError, collate_fn, fixed_pad_size, read_classmap
from ..data.images import load_shown_image
from ..data.loader import ignore_stop_signals
from ..data.samplers import ShardedSequentialSampler
from ..data.visualize import Detection, class_colors, draw_detections, save_image, write_kitti_labels
from ..errors import UsageError
from ..runtime import distributed
from ..runtime.logging import get_logger
from ..runtime.paths import task_results_dir
from .devices import select_gpus
from .loading import load_engine_for_inference, load_model_for_inference, require_checkpoint, require_tensorrt
from .predict import predict_batches
from .results_folder import record_effective_spec

log = get_logger("inference")

LABELS_DIR = "labels"
ANNOTATED_DIR = "images_annotated"


def output_names(paths: Sequence[str], is_internal: bool) -> dict[str, str]:
    """Image path -> its output name without extension (`stem`, or `folder/stem` when is_internal).

    Two images that would write the same label file are refused rather than overwritten.
    """
    names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{stem}" if is_internal else stem
        if name in owner:
            raise UsageError(f"dataset.infer_data_sources.image_dir: {owner[name]} and {path} would both write "
                             f"{LABELS_DIR}/{name}.txt; rename one"
                             + ("" if is_internal else ", or set inference.is_internal=true to keep folders apart"))
        owner[name] = path
        names[path] = name
    return names


class _ReportUndecodable(Dataset):
    """InferenceImages whose items are None (with the reason) for a file that fails to decode."""

    def __init__(self, images: InferenceImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return self.images[index]
        except UnreadableImageError as err:
            return None, {"path": self.images.paths[index], "error": str(err)}


def _collate(batch: Sequence[tuple[Optional[torch.Tensor], dict[str, Any]]], pad_to):
    """(images, masks, targets, failed): the readable items batched, the others' targets in `failed`."""
    readable = [item for item in batch if item[0] is not None]
    failed = [target for image, target in batch if image is None]
    if not readable:
        return None, None, [], failed
    return (*collate_fn(readable, pad_to=pad_to), failed)


def _readable_batches(loader: DataLoader, failed: list[dict]) -> Iterator[tuple]:
    for images, masks, targets, unreadable in loader:
        for item in unreadable:
            log.warning("skipping %s", item["error"])
        failed.extend(unreadable)
        if images is not None:
            yield images, masks, targets


def named_detections(found: dict, class_names: Sequence[str], conf_threshold: float,
                     classmap: str) -> list[Detection]:
    """Detections at or above `conf_threshold`, named by the classmap (id k is line k).

    Id 0 is the background slot, which training never teaches; an id past the classmap's
    last line means the classmap does not fit the model.
    """
    detections = []
    for score, label, box in zip(found["scores"].tolist(), found["labels"].tolist(), found["boxes"].tolist()):
        if score < conf_threshold or label == 0:
            continue
        if label > len(class_names):
            raise UsageError(f"dataset.infer_data_sources.classmap: the model predicts class id {label}, but "
                             f"{classmap} names only ids 1..{len(class_names)}; give one class name a line "
                             f"for every id of the model (dataset.num_classes - 1)")
        detections.append(Detection(class_names[label - 1], tuple(box), score))
    return detections


def _write_outputs(out: str, name: str, path: str, detections: list[Detection], colors: dict,
                   outline_width: int) -> None:
    write_kitti_labels(f"{out}/{LABELS_DIR}/{name}.txt", detections)
    # Drawn on the pixels the model saw: as shown (EXIF orientation applied, the frame the boxes are in),
    # 16-bit images scaled to 8 bits.
    drawn = draw_detections(load_shown_image(path), detections, colors, outline_width)
    extension = os.path.splitext(path)[1].lower() or ".png"
    save_image(drawn, f"{out}/{ANNOTATED_DIR}/{name}{extension}")


def _infer(spec: ExperimentConfig) -> int:
    engine = spec.inference.trt_engine
    checkpoint = None if engine else require_checkpoint(spec.inference.checkpoint, "inference.checkpoint")
    source = spec.dataset.infer_data_sources
    if source is None or not source.classmap:
        raise UsageError("dataset.infer_data_sources.classmap: not set; give the text file of class names, "
                         "one a line (line i names category id i)")
    class_names = read_classmap(source.classmap)
    colors = class_colors(class_names, spec.inference.color_map)
    info = distributed.setup()
    try:
        images = InferenceImages(spec)
        names = output_names(images.paths, spec.inference.is_internal)
        pad_to = fixed_pad_size(spec.dataset.augmentation)
        if engine:  # every image resized to the engine's input size; no padding
            from ..export.trt import engine_transform

            model, postprocessor, (height, width) = load_engine_for_inference(
                spec, "inference.trt_engine", info.device, spec.inference.input_width, spec.inference.input_height)
            images.transform = engine_transform(spec.dataset.augmentation, height, width)
            pad_to = None
        else:
            model, postprocessor = load_model_for_inference(spec, checkpoint, spec.encryption_key, info.device)
            if spec.inference.input_width and spec.inference.input_height:  # TAO stretches to exactly that size
                from ..data.transforms import build_fixed_size_transform

                images.transform = build_fixed_size_transform(
                    spec.dataset.augmentation, spec.inference.input_height, spec.inference.input_width)
                pad_to = None
        sampler = ShardedSequentialSampler(len(images), info.rank, info.world_size)
        batch_size = spec.inference.batch_size if spec.inference.batch_size > 0 else spec.dataset.batch_size
        log.info("inference: %d images, %d at a time", len(images), batch_size)
        loader = DataLoader(_ReportUndecodable(images), batch_size=batch_size, sampler=sampler,
                            num_workers=spec.dataset.workers, collate_fn=functools.partial(_collate, pad_to=pad_to),
                            worker_init_fn=ignore_stop_signals if spec.dataset.workers > 0 else None)
        out = task_results_dir(spec, "inference").rstrip("/")
        failed: list[dict] = []
        written = boxes = 0
        batches = _readable_batches(loader, failed)
        for target, found in predict_batches(model, postprocessor, batches, info.device, desc="inference",
                                             show_progress=info.is_main, total=len(loader)):
            detections = named_detections(found, class_names, spec.inference.conf_threshold, source.classmap)
            _write_outputs(out, names[target["path"]], target["path"], detections, colors,
                           spec.inference.outline_width)
            written += 1
            boxes += len(detections)
        summary = distributed.all_gather_objects((written, boxes, [item["path"] for item in failed]))
        if info.is_main:
            skipped = list(images.skipped) + [path for _, _, paths in summary for path in paths]
            log.info("inference: %d images, %d detections at or above %.2f, written to %s/{%s,%s}",
                     sum(s[0] for s in summary), sum(s[1] for s in summary), spec.inference.conf_threshold,
                     out, LABELS_DIR, ANNOTATED_DIR)
            if skipped:
                log.warning("skipped %d unreadable image(s): %s", len(skipped), ", ".join(skipped))
        # After every rank's outputs (the gather above waits for them): a stopped run leaves the earlier record.
        record_effective_spec(spec, "inference")
        return 0
    finally:
        distributed.cleanup()


def run(spec: ExperimentConfig) -> int:
    section = spec.inference
    num_gpus = select_gpus("inference", section.num_gpus, section.gpu_ids, section.num_nodes)
    if section.trt_engine:
        require_tensorrt("inference.trt_engine")
    launched = distributed.relaunch_in_workers(spec, "inference", num_gpus)
    if launched is not None:
        return launched
    return _infer(spec)
