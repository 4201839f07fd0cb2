"""Prometheus metrics of a training run, served on /metrics by rank 0.

Port: `train.metrics_port`, overridden by `DDETR_METRICS_PORT`; 0 turns metrics off and
every method becomes a no-op. Every series carries a `job` label (`DDETR_JOB_NAME`), so
many jobs share one dashboard; a scrape config must keep it (`honor_labels: true`, or
`honorLabels: true` in a PodMonitor), since Prometheus otherwise renames it `exported_job`.
Names follow Prometheus conventions: a `ddetr_train_` prefix, base units (seconds,
bytes), `_total` for counters.
"""
from __future__ import annotations

import errno
import os
import time
from typing import Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..errors import UsageError
from .logging import get_logger

log = get_logger("metrics")

PORT_ENV = "DDETR_METRICS_PORT"
JOB_ENV = "DDETR_JOB_NAME"
DEFAULT_JOB = "deformable-detr"
STEP_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def metrics_port(spec) -> int:
    """The /metrics port for this run: `DDETR_METRICS_PORT` if set, else `train.metrics_port`; 0 = off."""
    raw = os.environ.get(PORT_ENV)
    if raw is None or raw.strip() == "":
        return int(spec.train.metrics_port or 0)
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UsageError(f"{PORT_ENV}: {raw!r} is not a port; accepted: 0 (off) or 1..65535")
    return port


class TrainMetrics:
    """Training progress as Prometheus metrics; a no-op when `port` is 0 or this is not rank 0."""

    def __init__(self, port: int, job: Optional[str] = None, addr: str = "0.0.0.0"):
        self.port = port
        self.addr = addr
        self.job = job or os.environ.get(JOB_ENV) or DEFAULT_JOB
        self.enabled = port > 0 and int(os.environ.get("RANK", "0")) == 0
        self._server = None
        if not self.enabled:
            return
        # An own registry: several runs (or tests) in one process never collide.
        self.registry = registry = CollectorRegistry()
        job_label = ["job"]
        self._epoch = Gauge("ddetr_train_epoch", "Current training epoch, 0-based as in checkpoint names", job_label, registry=registry)
        self._num_epochs = Gauge("ddetr_train_num_epochs", "Epochs this run trains for", job_label,
                                 registry=registry)
        self._step = Gauge("ddetr_train_step", "Optimizer steps done (global step)", job_label, registry=registry)
        self._loss = Gauge("ddetr_train_loss", "Last training loss, per weighted loss term (term=total: their sum)",
                           ["job", "term"], registry=registry)
        self._lr = Gauge("ddetr_train_learning_rate", "Learning rate of the main parameter group", job_label,
                         registry=registry)
        self._images_per_second = Gauge("ddetr_train_images_per_second", "Training throughput of the last step",
                                        job_label, registry=registry)
        self._images = Counter("ddetr_train_images", "Training images processed", job_label, registry=registry)
        self._data_wait = Gauge("ddetr_train_data_wait_seconds", "Time the last step waited for its batch",
                                job_label, registry=registry)
        self._step_seconds = Histogram("ddetr_train_step_duration_seconds", "Wall time of one training step",
                                       job_label, buckets=STEP_SECONDS_BUCKETS, registry=registry)
        self._validation_map = Gauge("ddetr_train_validation_map", "Last validation COCO metrics (mAP, mAP50, ...)",
                                     ["job", "metric"], registry=registry)
        self._validation_loss = Gauge("ddetr_train_validation_loss", "Last validation loss values",
                                      ["job", "metric"], registry=registry)
        self._checkpoints = Counter("ddetr_train_checkpoints", "Checkpoints written", job_label, registry=registry)
        self._last_checkpoint = Gauge("ddetr_train_last_checkpoint_timestamp_seconds",
                                      "Unix time of the last checkpoint written", job_label, registry=registry)
        self._gpu_allocated = Gauge("ddetr_train_gpu_memory_allocated_bytes", "GPU memory held by tensors",
                                    ["job", "device"], registry=registry)
        self._gpu_reserved = Gauge("ddetr_train_gpu_memory_reserved_bytes", "GPU memory reserved by the allocator",
                                   ["job", "device"], registry=registry)
        self._gpu_peak = Gauge("ddetr_train_gpu_memory_peak_bytes", "Peak GPU memory held by tensors",
                               ["job", "device"], registry=registry)
        self._progress = Gauge("ddetr_train_progress_ratio", "Share of the run's training steps done (0..1)",
                               job_label, registry=registry)
        self._eta = Gauge("ddetr_train_estimated_remaining_seconds", "Estimated seconds until training ends, from "
                          "the recent step rate (warm-up steps left out)", job_label, registry=registry)
        # Series that exist from the start, so dashboards show 0 rather than "no data".
        self._checkpoints.labels(job=self.job)
        self._images.labels(job=self.job)

    def start(self) -> "TrainMetrics":
        if not self.enabled or self._server is not None:
            return self
        try:
            self._server, _thread = start_http_server(self.port, addr=self.addr, registry=self.registry)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UsageError(f"train.metrics_port / {PORT_ENV}: port {self.port} is already in use on "
                                 f"{self.addr}; choose another port, or 0 to turn metrics off") from None
            raise UsageError(f"train.metrics_port / {PORT_ENV}: cannot serve metrics on "
                             f"{self.addr}:{self.port}: {err.strerror}") from None
        log.info("serving Prometheus metrics on http://%s:%d/metrics (job=%s)", self.addr, self.port, self.job)
        return self

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        if self.enabled:
            self._epoch.labels(job=self.job).set(epoch)
            self._num_epochs.labels(job=self.job).set(num_epochs)

    def observe_step(self, *, epoch: int, step: int, losses: Mapping[str, float], lr: float, images: int,
                     step_seconds: float, data_wait_seconds: float) -> None:
        if not self.enabled:
            return
        job = self.job
        self._epoch.labels(job=job).set(epoch)
        self._step.labels(job=job).set(step)
        values = {term: float(value) for term, value in losses.items()}
        for term, value in values.items():
            self._loss.labels(job=job, term=term).set(value)
        if "total" not in values:
            self._loss.labels(job=job, term="total").set(sum(values.values()))
        self._lr.labels(job=job).set(lr)
        self._images.labels(job=job).inc(images)
        self._images_per_second.labels(job=job).set(images / step_seconds if step_seconds > 0 else 0.0)
        self._data_wait.labels(job=job).set(data_wait_seconds)
        self._step_seconds.labels(job=job).observe(step_seconds)
        self._observe_gpu_memory()

    def observe_progress(self, ratio: float, eta_seconds: Optional[float]) -> None:
        """Share of the steps done and the remaining time (None while the first steps warm up: not set)."""
        if not self.enabled:
            return
        self._progress.labels(job=self.job).set(ratio)
        if eta_seconds is not None:
            self._eta.labels(job=self.job).set(eta_seconds)

    def observe_validation(self, metrics: Mapping[str, float]) -> None:
        """Record validation results: mAP-style values as `validation_map`, `*loss*` values as `validation_loss`."""
        if not self.enabled:
            return
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue  # per-class tables and other non-scalars are not series
            gauge = self._validation_loss if "loss" in name else self._validation_map
            gauge.labels(job=self.job, metric=name).set(number)

    def observe_checkpoint(self, path: str) -> None:
        if not self.enabled:
            return
        self._checkpoints.labels(job=self.job).inc()
        self._last_checkpoint.labels(job=self.job).set(time.time())
        log.debug("checkpoint %s counted in metrics", path)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _observe_gpu_memory(self) -> None:
        import torch

        # Only once CUDA is in use: querying it must never be what initialises it.
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return
        device = torch.cuda.current_device()
        label = str(device)
        self._gpu_allocated.labels(job=self.job, device=label).set(torch.cuda.memory_allocated(device))
        self._gpu_reserved.labels(job=self.job, device=label).set(torch.cuda.memory_reserved(device))
        self._gpu_peak.labels(job=self.job, device=label).set(torch.cuda.max_memory_allocated(device))
