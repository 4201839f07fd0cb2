"""Rank 0's outputs in the train results folder: staging and upload, train_log.jsonl, status.json,
metrics, and how a run that fails leaves the folder (docs/architecture.md, "Train outputs")."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from typing import Optional

from ...config.schema import ExperimentConfig
from ...errors import UsageError, one_line
from ...runtime import checkpoint, distributed, storage
from ...runtime.artifacts import ArtifactSync, recover_staging, staging_dir
from ...runtime.files import remove_partial_writes
from ...runtime.logging import get_logger
from ...runtime.paths import task_results_dir
from ...runtime.progress import StepRate, format_duration
from ...runtime.scalars import step_scalars, validation_scalars
from ...runtime.status_file import STATUS_NAME, read_status
from ...runtime.storage import StorageError
from ...runtime.training_log import LOG_NAME, TrainingLog
from .state import Position

log = get_logger("train")
STATUS_UPLOAD_EVERY_S = 30.0  # remote results: status.json (the operator's progress and heartbeat) goes up this often


def _open_metrics(spec: ExperimentConfig):
    """Rank 0's Prometheus exporter (runtime.metrics), or None when the port is 0."""
    from ...runtime.metrics import TrainMetrics, metrics_port

    port = metrics_port(spec)
    if not port:
        return None
    metrics = TrainMetrics(port)  # job label from DDETR_JOB_NAME
    metrics.start()
    return metrics


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TrainOutputs:
    """The train results folder of one run; on ranks other than 0 every report is a no-op."""

    wandb = None  # rank 0's Weights & Biases run (runtime/wandb_log.py), from start() when wandb.enable is set
    events = None  # rank 0's TensorBoard event files (runtime/tensorboard_log.py), from start()

    def __init__(self, spec: ExperimentConfig, is_main: bool) -> None:
        self.spec, self.is_main = spec, is_main
        self.results_dir = task_results_dir(spec, "train").rstrip("/")
        self.remote = storage.is_remote(self.results_dir)
        # Remote results: everything is written into a local staging folder, then uploaded. Its path is
        # stable (artifacts.staging_dir), so what a run could not upload is found by the next one.
        self.local_dir = staging_dir(self.results_dir) if self.remote else self.results_dir
        if self.remote:
            os.makedirs(self.local_dir, exist_ok=True)
        # Checkpoints leave the staging disk once uploaded: a pod's disk holds only those in flight.
        self.sync = ArtifactSync(self.local_dir, self.results_dir if self.remote else None,
                                 remove_uploaded_checkpoints=True)
        self.training_log: Optional[TrainingLog] = None
        self.uploaded_checkpoint: Optional[str] = None
        self.metrics = None
        self.rate = StepRate()  # the run's recent pace: percent done and finish time
        self.steps_per_epoch = 0
        self._last_step_end: Optional[float] = None
        self._launched = time.monotonic()  # this launch's start, for its start-up time
        self._status_uploaded = 0.0

    def prepare(self) -> None:
        """Rank 0, first: remove partial writes a killed run left; upload what an earlier run could not."""
        if not self.is_main:
            return
        if self.remote:
            recover_staging(self.local_dir, self.results_dir)
            return
        removed = remove_partial_writes(self.local_dir)
        if removed:
            log.warning("removed %d partial file(s) a stopped run left in %s: %s", len(removed), self.local_dir,
                        ", ".join(sorted(removed)))

    def open(self, resumed_from: Optional[str]) -> None:
        """Rank 0, once the model, data and starting point are known: the run now owns status.json and
        the log. A resumed run continues them (a restarted pod downloads them); a fresh one starts anew."""
        if not self.is_main:
            return
        os.makedirs(self.local_dir, exist_ok=True)
        for name in (LOG_NAME, STATUS_NAME):
            local = os.path.join(self.local_dir, name)
            if resumed_from is None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(local)
            elif self.remote and storage.exists(f"{self.results_dir}/{name}"):
                storage.download(f"{self.results_dir}/{name}", local)
        self.training_log = TrainingLog(self.local_dir, self.spec.train.num_epochs)
        # The checkpoint an earlier launch reported (uploaded, as its run ended): named again should
        # this run's own uploads fail.
        self.uploaded_checkpoint = self.training_log.status.last_checkpoint
        self.metrics = _open_metrics(self.spec)

    def start(self, position: Position, resumed_from: Optional[str], world_size: int, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        if self.training_log is None:
            return
        train = self.spec.train
        self._count_recomputed(position)
        self.training_log.update_status(epoch=position.epoch, epoch_index=position.epoch, step=position.step,
                                        state="running")
        # One per launch: a fresh run (resumed_from null) starts a fresh log.
        self.training_log.append("start", epoch=position.epoch, step=position.step,
                                 batches_done=position.batches_done, resumed_from=resumed_from,
                                 world_size=world_size, precision=train.precision,
                                 strategy=train.distributed_strategy)
        from ...runtime.tensorboard_log import open_events
        from ...runtime.wandb_log import open_run
        # This launch's first step: earlier launches' points from there on were recomputed (or, in a fresh
        # run, belong to an earlier run in this folder), so TensorBoard drops them.
        self.events = open_events(self.local_dir, position.step + 1)
        # A remote results folder's staging copy is removed at the end: W&B's files go to its default place.
        self.wandb = open_run(self.spec, None if self.remote else self.local_dir)

    def epoch_started(self, epoch: int) -> None:
        if self.metrics is not None:
            self.metrics.set_epoch(epoch, self.spec.train.num_epochs)
        if self.training_log is not None:
            self.training_log.status.epoch_index = epoch

    def step(self, position: Position, losses: dict[str, float], lr: float, images: int, step_seconds: float,
             data_wait: float, memory_mb: float, group_lrs: Optional[dict[str, float]] = None) -> None:
        """`lr`: the main parameter group's; `group_lrs`: every group's by name (rest, backbone,
        linear_proj), for the curves."""
        if self.training_log is None:
            return
        self._track_progress(position, images, step_seconds)
        self._count_step_time(step_seconds)
        self.training_log.log_step(epoch=position.epoch, step=position.step, losses=losses, lr=lr,
                                   images_per_s=images / max(step_seconds, 1e-9), step_seconds=step_seconds,
                                   data_wait_seconds=data_wait, memory_mb=memory_mb)
        if self.metrics is not None:
            self.metrics.observe_step(epoch=position.epoch, step=position.step, losses=losses, lr=lr,
                                      images=images, step_seconds=step_seconds, data_wait_seconds=data_wait)
        # One feed of scalars for both curve writers (runtime/scalars.py).
        self._curves(step_scalars(losses, lr, position.epoch, images_per_s=images / max(step_seconds, 1e-9),
                                  step_seconds=step_seconds, data_wait_seconds=data_wait,
                                  **{f"lr_{name}": value for name, value in (group_lrs or {}).items()}),
                     position.step)

    def _track_progress(self, position: Position, images: int, step_seconds: float) -> None:
        """Percent done, recent images/s and the finish time into status.json (written with the next step
        record) and the metrics; `images`: this step's, all ranks."""
        now = time.monotonic()
        if position.batches_done == 1 and self._last_step_end is not None:  # an epoch's end came between
            self.rate.add_pause(max(0.0, now - step_seconds - self._last_step_end))
        self._last_step_end = now
        self.rate.add_step(step_seconds, images)
        total = self.spec.train.num_epochs * self.steps_per_epoch
        # At most the total: an epoch resumed at another world size may count its steps differently.
        done = min(position.epoch * self.steps_per_epoch + position.batches_done, total)
        status = self.training_log.status
        status.percent = round(100.0 * done / total, 2)
        eta = self.rate.eta_seconds(total - done, self.spec.train.num_epochs - position.epoch)
        rate = self.rate.images_per_second
        status.images_per_second = None if rate is None else round(rate, 2)
        status.eta_seconds = None if eta is None else round(eta, 1)
        status.estimated_finish_time = None if eta is None else \
            (datetime.now(timezone.utc) + timedelta(seconds=eta)).strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.metrics is not None:
            self.metrics.observe_progress(done / total, eta)

    def _count_recomputed(self, position: Position) -> None:
        """A resumed launch: the steps the last launch trained past its checkpoint are trained again; their
        time moves from training to recomputed (status.json carried over holds where it got to)."""
        status = self.training_log.status
        lost_steps = max(0, status.step - position.step)
        if lost_steps:
            status.recomputed_steps += lost_steps
            status.recomputed_seconds = round(status.recomputed_seconds + status.unsaved_seconds, 3)
            status.train_seconds = round(max(0.0, status.train_seconds - status.unsaved_seconds), 3)
        status.unsaved_seconds = 0.0

    def _count_step_time(self, step_seconds: float) -> None:
        status = self.training_log.status
        now = time.monotonic()
        if self._launched is not None:  # this launch's first step
            status.startup_seconds = round(status.startup_seconds + max(0.0, now - step_seconds - self._launched), 3)
            self._launched = None
        status.train_seconds = round(status.train_seconds + step_seconds, 3)
        status.unsaved_seconds = round(status.unsaved_seconds + step_seconds, 3)
        if self.remote and now - self._status_uploaded >= STATUS_UPLOAD_EVERY_S:
            self._status_uploaded = now
            self.sync.upload(STATUS_NAME)  # as last written (at most status_every_s old)

    def add_time(self, field: str, seconds: float) -> None:
        """Time spent outside steps: eval_seconds (validation) or checkpoint_seconds."""
        if self.training_log is None:
            return
        status = self.training_log.status
        setattr(status, field, round(getattr(status, field) + seconds, 3))

    def progress_note(self) -> str:
        """The whole run's percent and ETA, for the epoch's progress line."""
        status = self.training_log.status if self.training_log is not None else None
        if status is None or status.percent is None:
            return ""
        eta = "warming up" if status.eta_seconds is None else f"ETA {format_duration(status.eta_seconds)}"
        return f"; run {status.percent:.1f}% done, {eta}"

    def images_skipped(self, position: Position, new: list[str], total: int) -> None:
        """Training images skipped (unusable): the new ones in the log, the count in status.json."""
        if self.training_log is None:
            return
        if new:
            self.training_log.append("skipped", epoch=position.epoch, step=position.step, images=new,
                                     skipped_samples=total)
        self.training_log.update_status(skipped_samples=total)

    def validation(self, position: Position, metrics: dict) -> None:
        self.training_log.log_validation(epoch=position.epoch, step=position.step, metrics=metrics)
        if self.metrics is not None:
            self.metrics.observe_validation({k: v for k, v in metrics.items() if k != "per_class_AP"})
        self._curves(validation_scalars(metrics), position.step)

    def _curves(self, values: dict[str, float], step: int) -> None:
        for writer in (self.events, self.wandb):
            if writer is not None:
                writer.log(values, step)

    def checkpoint_saved(self, path: str) -> str:
        """Queue the checkpoint rank 0 wrote at `path` for upload and report it; its name in the results folder."""
        self.sync.publish_checkpoint(os.path.basename(path), latest_name=checkpoint.LATEST_NAME)
        shown = f"{self.results_dir}/{os.path.basename(path)}"
        self.training_log.update_status(last_checkpoint=shown, unsaved_seconds=0.0)
        if self.metrics is not None:
            self.metrics.observe_checkpoint(shown)
        log.info("checkpoint: %s", shown)
        return shown

    def best_candidate(self, shown: str, epoch: int, validation_map: float) -> None:
        """The checkpoint `shown`, whose weights validation scored `validation_map`: the run's best when no
        earlier checkpoint scored higher (status.json's best_*, also across restarts)."""
        status = self.training_log.status
        if status.best_map is not None and validation_map <= status.best_map:
            return
        status.best_map, status.best_epoch, status.best_checkpoint = validation_map, epoch, shown
        self.training_log.write_status()

    def target_reached(self, position: Position, validation_map: float, target: float) -> None:
        reason = (f"validation mAP {validation_map:.4f} reached the target {target:g} at epoch {position.epoch} "
                  f"(0-based), step {position.step}")
        log.info("%s: training ends here as completed", reason)
        self.training_log.status.stop_reason = reason
        self.training_log.append("target_reached", epoch=position.epoch, step=position.step, mAP=validation_map,
                                 target=target)

    def epoch_done(self, position: Position, lr: float, checksums: list) -> None:
        self.training_log.append("epoch", epoch=position.epoch, step=position.step, lr=lr,
                                 train_loss=position.train_loss, weight_checksums=checksums)
        self.training_log.update_status(epoch=position.epoch + 1, epoch_index=position.epoch, step=position.step)
        self.upload_logs()

    def upload_logs(self) -> None:
        if self.is_main:
            self.sync.upload(LOG_NAME)
            self.sync.upload(STATUS_NAME)
            for name in self.events.files() if self.events is not None else ():
                self.sync.upload(name)

    def record_failed_attempt(self, err: BaseException) -> None:
        """A run that failed before it started training leaves status.json (and the cli experiment.yaml)
        as the last run left them: the attempt is a record at the end of train_log.jsonl instead, unless
        its input was refused (the one line and exit code 2 say it; the folder stays as it was) or the
        log is a completed run's (nothing is added to a finished record)."""
        if not self.is_main or self.remote or isinstance(err, UsageError):
            return
        path = os.path.join(self.local_dir, LOG_NAME)
        if not os.path.isfile(path) or (read_status(self.local_dir) or {}).get("state") == "completed":
            return
        record = {"kind": "failed_attempt", "time": round(time.time(), 3), "error": one_line(err),
                  "exit_code": distributed.exit_code_for(err)}
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as write_error:
            log.error("could not record the failed attempt in %s: %s", path, write_error)

    def _record_not_uploaded(self) -> None:
        """After an upload failed for good, the status.json kept in the staging folder says so instead of
        claiming the run's end: state failed, what is staged and not uploaded, and as last checkpoint
        only one that reached the results folder."""
        if self.training_log is None:
            return
        pending = self.sync.not_uploaded
        status = self.training_log.status
        if status.last_checkpoint and os.path.basename(status.last_checkpoint) in pending:
            uploaded = self.sync.latest.get(checkpoint.LATEST_NAME)
            status.last_checkpoint = f"{self.results_dir}/{uploaded}" if uploaded else self.uploaded_checkpoint
        try:
            self.training_log.update_status(state="failed", not_uploaded=pending)
        except (UsageError, OSError) as err:
            log.error("also, status.json could not say what is not uploaded: %s", one_line(err))

    def finish(self, state: str, error: Optional[BaseException] = None) -> None:
        """Record the run's final state, close the log and metrics, and wait for the uploads."""
        if self.wandb is not None:
            self.wandb.finish(state)
        if self.events is not None:
            self.events.close()
        if self.training_log is not None:
            status = self.training_log.status
            if state == "completed":
                if status.stop_reason is None:
                    status.percent = 100.0
                status.eta_seconds, status.estimated_finish_time = 0.0, _utc_now()
            else:  # not running: no finish to expect
                status.eta_seconds = status.estimated_finish_time = None
            try:
                self.training_log.update_status(state=state)
            except (UsageError, OSError) as err:  # a full disk: the training error is the one to surface
                if state != "failed":
                    raise
                log.error("also, status.json could not be updated: %s", one_line(err))
            self.training_log.close()
            self.upload_logs()
        elif error is not None:
            self.record_failed_attempt(error)
        if self.metrics is not None:
            self.metrics.close()
        try:
            self.sync.close()  # raises when an upload failed for good: the staging copy is then kept
        except StorageError as err:
            self._record_not_uploaded()
            kept = StorageError(f"{err}; kept in {self.local_dir}, which the next run with this results folder "
                                "uploads first", retryable=err.retryable)
            if state != "failed":
                raise kept from None
            # Training already failed: its error is the one to surface; the upload failure is logged.
            log.error("also, uploading the results failed: %s", kept)
            return
        # Everything is uploaded: the staging copy can go (rank 0's: a peer on its node must not take
        # it away while rank 0 still uploads from it).
        if self.is_main and self.remote and state != "failed":
            shutil.rmtree(self.local_dir, ignore_errors=True)
