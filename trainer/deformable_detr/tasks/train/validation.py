"""Validation during training: COCO mAP of what every rank predicts, through the evaluation path
(tasks/predict.py), and the validation loss when AutoReduce watches it."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ...config.schema import ExperimentConfig
from ...runtime import distributed
from ..predict import predict
from .batches import float_outputs, padded_batches, to_device


class Validation:
    """Scores a model on dataset.val_data_sources; rank 0 scores what every rank predicted."""

    def __init__(self, spec: ExperimentConfig, info: distributed.DistInfo, criterion, postprocessor,
                 dataset, loader) -> None:
        self.spec, self.info = spec, info
        self.criterion, self.postprocessor = criterion, postprocessor
        self.dataset, self.loader = dataset, loader

    def run(self, model: torch.nn.Module, sharded: bool, with_loss: bool) -> tuple[Optional[dict], Optional[float]]:
        """(metrics on rank 0, else None; the validation loss, the same on every rank, when `with_loss`)."""
        from ...data.coco_eval import evaluate_coco

        model.eval()
        # DDP's forward would sync buffers per batch and ranks may hold different batch counts:
        # predict with the bare module. FSDP2 must run every forward on every rank, and the loss
        # averages box counts over ranks in each batch: both pad the batch counts to the largest.
        predictor = model if sharded else distributed.unwrap_model(model)
        batches: Iterable = self.loader
        if sharded or (with_loss and self.info.distributed):
            batches = padded_batches(self.loader, max(distributed.all_gather_objects(len(self.loader))))
        loss = _LossPerImage(self.criterion, self.info.device) if with_loss else None
        detections = predict(predictor, self.postprocessor, batches, self.info.device,
                             show_progress=self.info.is_main, desc="validate", total=len(self.loader),
                             on_outputs=loss)
        val_loss = loss.mean_over_ranks() if loss is not None else None
        gathered = distributed.all_gather_objects([d for d in detections if d["image_id"] >= 0])
        model.train()
        if not self.info.is_main:
            return None, val_loss
        results = sorted((d for part in gathered for d in part),
                         key=lambda d: (d["image_id"], -d["score"], d["category_id"]))
        scores = evaluate_coco(self.dataset.coco, results, class_ids=self.spec.dataset.eval_class_ids)
        metrics = {"mAP": scores["AP"], "mAP50": scores["AP50"], "mAP75": scores["AP75"],
                   "per_class_AP": scores["per_class"]}
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        return metrics, val_loss


class _LossPerImage:
    """TAO's val_loss: the training loss, weighted alike, on validation images, per image over every
    rank. Padding batches (image_id -1) count for nothing."""

    def __init__(self, criterion, device: torch.device) -> None:
        self.criterion, self.device = criterion, device
        self.loss_sum, self.images = 0.0, 0

    def __call__(self, outputs: dict, targets: list[dict]) -> None:
        real = sum(1 for t in targets if int(t["image_id"]) >= 0)
        losses = self.criterion(float_outputs(outputs), to_device(targets, self.device))
        self.loss_sum += float(sum(losses.values())) * real
        self.images += real

    def mean_over_ranks(self) -> float:
        total = distributed.all_reduce_mean(torch.tensor([self.loss_sum, float(self.images)], dtype=torch.float64))
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")
