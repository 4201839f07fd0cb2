"""`deformable-detr evaluate`: COCO box metrics of a checkpoint on dataset.test_data_sources.

Writes, in the task's results folder, `results.json` (the metrics and per-class AP) and
`detections.json` (every kept detection, COCO results format). evaluate.batch_size images go
through the model at once (-1: dataset.batch_size). evaluate.gpu_ids picks the GPUs; with
several (evaluate.num_gpus) the images are sharded across torchrun workers and rank 0 gathers
and scores them.
With evaluate.trt_engine a TensorRT engine (export/trt.py) runs instead of the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json

from ..config.schema import ExperimentConfig
from ..data.coco_eval import STAT_NAMES, evaluate_coco
from ..errors import UsageError
from ..runtime import distributed
from ..runtime.logging import get_logger
from ..runtime.paths import task_results_dir
from .devices import select_gpus
from ..runtime.storage import write_text
from .loading import load_engine_for_inference, load_model_for_inference, require_checkpoint, require_tensorrt
from .predict import predict
from .results_folder import results_recorded

log = get_logger("evaluate")

RESULTS_FILE = "results.json"
DETECTIONS_FILE = "detections.json"


def _show(value: float) -> str:
    return "n/a" if value < 0 else f"{value:.4f}"


def format_metrics(metrics: dict) -> str:
    """The summary numbers, then the AP of each class, as two plain-text tables."""
    lines = [f"{'metric':<10} {'value':>8}", "-" * 19]
    lines += [f"{name:<10} {_show(metrics[name]):>8}" for name in STAT_NAMES]
    per_class = metrics["per_class"]
    width = max([len("class")] + [len(name) for name in per_class])
    lines += ["", f"{'class':<{width}} {'AP':>8}", "-" * (width + 9)]
    lines += [f"{name:<{width}} {_show(ap):>8}" for name, ap in per_class.items()]
    return "\n".join(lines)


def _evaluate_checkpoint(spec: ExperimentConfig) -> int:
    from ..data import build_dataloader, build_dataset

    engine = spec.evaluate.trt_engine
    checkpoint = None if engine else require_checkpoint(spec.evaluate.checkpoint, "evaluate.checkpoint")
    if spec.dataset.test_data_sources is None:
        raise UsageError("dataset.test_data_sources: not set; give {image_dir, json_file} of the images to score")
    if spec.evaluate.batch_size > 0:
        spec = dataclasses.replace(spec, dataset=dataclasses.replace(spec.dataset, batch_size=spec.evaluate.batch_size))
    info = distributed.setup()
    try:
        if engine:  # every image resized to the engine's input size; no padding
            from ..export.trt import engine_transform, without_fixed_padding

            model, postprocessor, (height, width) = load_engine_for_inference(
                spec, "evaluate.trt_engine", info.device, spec.evaluate.input_width, spec.evaluate.input_height)
            data_spec = without_fixed_padding(spec)
            dataset = build_dataset(data_spec, "test",
                                    transform=engine_transform(spec.dataset.augmentation, height, width))
            loader = build_dataloader(data_spec, "test", rank=info.rank, world_size=info.world_size, dataset=dataset)
        else:
            model, postprocessor = load_model_for_inference(spec, checkpoint, spec.encryption_key, info.device)
            dataset = build_dataset(spec, "test")
            loader = build_dataloader(spec, "test", rank=info.rank, world_size=info.world_size, dataset=dataset)
        log.info("evaluate: %d images, %d at a time", len(dataset), loader.batch_size)
        detections = predict(model, postprocessor, loader, info.device, spec.evaluate.conf_threshold,
                             show_progress=info.is_main)
        gathered = distributed.all_gather_objects(detections)
        if not info.is_main:
            return 0
        detections = sorted((det for part in gathered for det in part),
                            key=lambda det: (det["image_id"], -det["score"], det["category_id"]))
        metrics = evaluate_coco(dataset.coco, detections, class_ids=spec.dataset.eval_class_ids)
        print(format_metrics(metrics), flush=True)
        out = task_results_dir(spec, "evaluate").rstrip("/")
        report = dict(metrics)
        report.update(checkpoint=checkpoint, conf_threshold=spec.evaluate.conf_threshold,
                      num_images=len(dataset.coco.getImgIds()), num_detections=len(detections))
        if engine:
            report["trt_engine"] = engine
        with results_recorded(spec, "evaluate"):  # the results and experiment.yaml, both or neither
            write_text(f"{out}/{DETECTIONS_FILE}", json.dumps(detections))
            write_text(f"{out}/{RESULTS_FILE}", json.dumps(report, indent=2))
        log.info("AP %.4f over %d images; results in %s/%s", metrics["AP"], report["num_images"], out, RESULTS_FILE)
        return 0
    finally:
        distributed.cleanup()


def run(spec: ExperimentConfig) -> int:
    section = spec.evaluate
    num_gpus = select_gpus("evaluate", section.num_gpus, section.gpu_ids, section.num_nodes)
    if section.trt_engine:
        require_tensorrt("evaluate.trt_engine")
    launched = distributed.relaunch_in_workers(spec, "evaluate", num_gpus)
    if launched is not None:
        return launched
    return _evaluate_checkpoint(spec)
