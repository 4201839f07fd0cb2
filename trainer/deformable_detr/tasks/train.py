"""`deformable-detr train`: Deformable DETR training, one process to a multi-node torchrun gang.

Outside torchrun, `train.num_gpus` > 1 (or `--gpus N`) re-runs this command under torchrun;
inside, every worker joins the process group. Rank 0 writes, into the task's results folder
(a local staging folder uploaded in the background when that folder is s3://):
- `model_epoch_{epoch:03d}_step_{step:05d}.pth` every `checkpoint_interval` epochs, and
  `dd_model_latest.pth` once that file is complete;
- `train_log.jsonl` (a record per step, per validation, per epoch) and `status.json`.
A run resumes exactly from `resume_training_checkpoint_path`, else (`auto_resume`) from
the newest readable checkpoint in its results folder (an unreadable one is skipped, and
named). SIGTERM (or a first SIGINT) stops every rank at the next step; rank 0 saves a
checkpoint and the run exits 143 (130).

Exact resume, mid-epoch too: checkpoints hold every rank's RNG states and the batches
done in the epoch; a resumed epoch starts at the sampler after those batches (they are
not read again), each sample is augmented with a seed of its own (seed, epoch, rank,
place in the epoch) whatever the number of loader workers, and validation runs with the
RNG saved and restored around it. A resumed run so draws the same numbers as an
uninterrupted one.

Epochs: `epoch` is 0-based everywhere it names an epoch (checkpoint names, train_log.jsonl,
log lines); status.json's `epoch` (and `epochs_completed`) counts finished epochs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import time
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from ..config.loader import spec_to_dict
from ..config.schema import ExperimentConfig
from ..errors import UsageError
from ..runtime import checkpoint, distributed, storage
from ..runtime.artifacts import ArtifactSync, recover_staging, staging_dir
from ..runtime.files import disk_full_error, is_disk_full, remove_partial_writes
from ..runtime.logging import get_logger
from ..runtime.optim import build_optimizer, build_scheduler, monitors_a_value
from ..runtime.paths import task_results_dir
from ..runtime.progress import progress
from ..runtime.signals import StopRequest
from .common import check_resume, relaunch_in_workers
from ..runtime.storage import StorageError
from ..runtime.status_file import STATUS_NAME
from ..runtime.training_log import LOG_NAME, TrainingLog

log = get_logger("train")

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Position:
    """Where training stands: the epoch in progress, batches of it done, optimizer steps overall,
    and the sum of this epoch's step losses so far (its mean is `train_loss` for AutoReduce)."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0

    @property
    def train_loss(self) -> Optional[float]:
        return self.loss_sum / self.loss_steps if self.loss_steps else None


def run(spec: ExperimentConfig) -> int:
    launched = relaunch_in_workers(spec, "train", spec.train.num_gpus, spec.train.num_nodes)
    if launched is not None:
        return launched
    try:
        code = Trainer(spec, distributed.setup()).fit()
        # Leave together: a rank that tears its process group down while a peer is still in a
        # collective (rank 0 saving the last checkpoint) can abort at exit.
        distributed.barrier()
    except BaseException as err:
        if is_disk_full(err):  # a write outside the atomic helpers: still one line, still retryable
            err = disk_full_error(getattr(err, "filename", None) or task_results_dir(spec, "train"))
        code = distributed.exit_code_for(err)
        distributed.record_exit_code(code)
        if code != distributed.EXIT_PEER_LOST:
            raise err
        # A peer is gone (killed, node lost, timed out): a retryable code, not the traceback of a bug.
        log.error("lost contact with another training process (%s); exiting %d so that the run is retried",
                  _one_line(err), code)
        return code
    finally:
        distributed.cleanup()
    distributed.record_exit_code(code)
    return code


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _float_outputs(value: Any) -> Any:
    """Model outputs in float32, so that matching and losses run at full precision under autocast."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float_outputs(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_float_outputs(v) for v in value)
    return value


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("train.precision: bf16 needs a GPU with bfloat16 support (Ampere or newer); "
                         "accepted here: fp32, fp16")


def _open_metrics(spec: ExperimentConfig, is_main: bool):
    """Rank 0's Prometheus exporter (runtime.metrics), or None when the port is 0."""
    if not is_main:
        return None
    from ..runtime.metrics import TrainMetrics, metrics_port

    port = metrics_port(spec)
    if not port:
        return None
    metrics = TrainMetrics(port)  # job label from DDETR_JOB_NAME
    metrics.start()
    return metrics


class Trainer:
    """One worker's training: model, data, optimizer, and rank 0's outputs."""

    def __init__(self, spec: ExperimentConfig, info: distributed.DistInfo) -> None:
        self.spec, self.info, self.train_cfg = spec, info, spec.train
        _check_precision(self.train_cfg.precision, info.device)
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
        self.metrics = None
        self.resumed_from: Optional[str] = None

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        from ..data import build_dataloader, build_dataset
        from ..model import build_model

        spec, info = self.spec, self.info
        optim = self.train_cfg.optim
        if optim.lr_scheduler == "AutoReduce" and optim.lr_monitor == "val_loss" and not spec.dataset.val_data_sources:
            raise UsageError("train.optim.lr_monitor: val_loss needs dataset.val_data_sources (AutoReduce watches "
                             "the validation loss); give validation data or set train.optim.lr_monitor: train_loss")
        # The same seed on every rank gives every rank the same initial weights (FSDP2 shards them as they are).
        torch.manual_seed(self.train_cfg.seed)
        model, self.criterion, self.postprocessor = build_model(spec)
        self._load_pretrained(model)
        self.model = distributed.wrap_model(model, self.train_cfg.distributed_strategy, info,
                                            shard_units=self._shard_units(model))
        self.criterion.to(info.device)
        self.optimizer = build_optimizer(self._bare_model, spec)
        self.scheduler = build_scheduler(self.optimizer, self.train_cfg.optim)
        fp16 = self.train_cfg.precision == "fp16"
        if fp16 and self.sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler(info.device.type)
        else:
            self.scaler = torch.amp.GradScaler(info.device.type, enabled=fp16)
        self.train_loader = build_dataloader(spec, "train", rank=info.rank, world_size=info.world_size)
        if len(self.train_loader) == 0:
            raise UsageError("dataset.train_data_sources: no training batch for this process; "
                             "use more images or fewer processes")
        self.val_dataset = build_dataset(spec, "val") if spec.dataset.val_data_sources else None
        self.val_loader = (build_dataloader(spec, "val", rank=info.rank, world_size=info.world_size,
                                            dataset=self.val_dataset) if self.val_dataset is not None else None)
        # Per-rank randomness from here on (dropout, augmentation in the main process).
        _seed_everything(self.train_cfg.seed + info.rank)

    @property
    def _bare_model(self) -> torch.nn.Module:
        # State dicts go through the module itself: torch.distributed.checkpoint maps the names of
        # modules shared under two paths (bbox_embed) wrongly under a DDP wrapper.
        return distributed.unwrap_model(self.model)

    @property
    def sharded(self) -> bool:
        return self.info.distributed and self.train_cfg.distributed_strategy == "ddp_sharded"

    @staticmethod
    def _shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
        """FSDP2 units: each encoder and decoder layer (the bulk of the weights); the rest stays in the root."""
        transformer = getattr(model, "transformer", None)
        units: list[torch.nn.Module] = []
        for part in ("encoder", "decoder"):
            layers = getattr(getattr(transformer, part, None), "layers", None)
            units.extend(layers or [])
        return units

    def _load_pretrained(self, model: torch.nn.Module) -> None:
        path = self.train_cfg.pretrained_model_path
        if not path or self._resume_path() is not None:
            return
        from ..model.checkpoint_compat import load_model_state
        from ..runtime.checkpoint_io import load_object

        try:
            load_model_state(model, load_object(path, self.spec.encryption_key), allow_num_classes_change=True)
        except UsageError as err:
            raise UsageError(f"train.pretrained_model_path: {err}") from None
        log.info("fine-tuning from %s", path)

    # ----------------------------------------------------------------- resume
    def _resume_path(self) -> Optional[str]:
        if self.train_cfg.resume_training_checkpoint_path:
            return self.train_cfg.resume_training_checkpoint_path
        if self.train_cfg.auto_resume:
            return checkpoint.find_resume_checkpoint(self.results_dir)
        return None

    def _load_resume_state(self) -> tuple[Optional[str], Optional[dict]]:
        """(path, state) of the checkpoint to resume from; auto_resume skips unreadable ones, saying which."""
        if self.train_cfg.resume_training_checkpoint_path:
            path = self.train_cfg.resume_training_checkpoint_path
            return path, checkpoint.load_checkpoint(path, self.spec.encryption_key)
        if not self.train_cfg.auto_resume:
            return None, None
        found = checkpoint.load_newest_readable(self.results_dir, self.spec.encryption_key)
        if found is None:
            return None, None
        path, state, skipped = found
        for bad, reason in skipped:
            log.warning("auto_resume: skipping %s, which cannot be read (%s); resuming from %s", bad, reason, path)
        return path, state

    def _resume(self) -> tuple[Position, Optional[dict]]:
        """Load the resume checkpoint into model, optimizer, schedule and scaler; (position, RNG states)."""
        path, state = self._load_resume_state()
        if path is None or state is None:
            return Position(), None
        self.resumed_from = path
        check_resume(self.spec, state, path)  # same network, and epochs left to train
        missing = [k for k in ("model", "optimizer", "lr_scheduler", "epoch", "step") if k not in state]
        if missing:
            raise UsageError(f"train.resume_training_checkpoint_path: {path} is not a training checkpoint "
                             f"(missing {', '.join(missing)}); use train.pretrained_model_path to fine-tune from it")
        saved_on_plateau = "best" in state["lr_scheduler"]  # ReduceLROnPlateau's state has its best value
        if saved_on_plateau != monitors_a_value(self.scheduler):
            raise UsageError(f"train.optim.lr_scheduler: {path} was trained with "
                             f"{'AutoReduce' if saved_on_plateau else 'MultiStep or StepLR'}, this spec asks for "
                             f"{self.train_cfg.optim.lr_scheduler}; resume with the spec it was trained with")
        try:
            checkpoint.load_model_and_optimizer(self._bare_model, self.optimizer, state["model"], state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"train.resume_training_checkpoint_path: {path} does not fit the model and optimizer "
                             f"built from this spec ({first_line}); resume with the spec it was trained with") from None
        self.scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("epoch_finished", True):
            position = Position(epoch=int(state["epoch"]) + 1, batches_done=0, step=int(state["step"]))
        else:
            epoch_loss = state.get("epoch_loss") or {}
            position = Position(epoch=int(state["epoch"]), batches_done=int(state.get("batches_done", 0)),
                                step=int(state["step"]), loss_sum=float(epoch_loss.get("sum", 0.0)),
                                loss_steps=int(epoch_loss.get("steps", 0)))
        log.info("resuming from %s: epoch %d (0-based), batch %d, step %d", path, position.epoch,
                 position.batches_done, position.step)
        return position, state.get("rng")

    def _restore_rng(self, rng: Optional[dict]) -> None:
        if not rng:
            return
        per_rank = rng.get("ranks", [])
        if len(per_rank) == self.info.world_size:
            checkpoint.restore_rng_state(per_rank[self.info.rank])
        else:
            log.warning("checkpoint saved by %d process(es), now %d: random streams start afresh",
                        len(per_rank), self.info.world_size)

    # ------------------------------------------------------------ checkpoint
    def _save(self, position: Position, epoch_finished: bool) -> Optional[str]:
        """Every rank gathers (collectives for FSDP2); rank 0 writes. Returns the path on rank 0."""
        model_state = checkpoint.gather_model_state(self._bare_model)
        optimizer_state = checkpoint.gather_optimizer_state(self._bare_model, self.optimizer)
        rng_states = distributed.all_gather_objects(checkpoint.capture_rng_state())
        if not self.info.is_main:
            return None
        state = {
            "model": model_state, "optimizer": optimizer_state, "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": position.epoch, "step": position.step, "batches_done": position.batches_done,
            "epoch_finished": epoch_finished, "rng": {"ranks": rng_states},
            "epoch_loss": {"sum": position.loss_sum, "steps": position.loss_steps},
            "spec": spec_to_dict(dataclasses.replace(self.spec, encryption_key=None)),
        }
        # With remote results the sync moves the remote latest once the upload is complete; a local
        # latest in the staging folder would only keep a checkpoint's bytes on the pod's disk.
        path = checkpoint.save_checkpoint(state, self.local_dir, key=self.spec.encryption_key,
                                          update_latest=not self.remote)
        self.sync.publish_checkpoint(os.path.basename(path), latest_name=checkpoint.LATEST_NAME)
        shown = f"{self.results_dir}/{os.path.basename(path)}"
        self.training_log.update_status(last_checkpoint=shown)
        if self.metrics is not None:
            self.metrics.observe_checkpoint(shown)
        log.info("checkpoint: %s", shown)
        return shown

    # ------------------------------------------------------------------- step
    def _train_step(self, images, masks, targets) -> dict[str, torch.Tensor]:
        device, precision = self.info.device, self.train_cfg.precision
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        targets = _to_device(targets, device)
        dtype = AUTOCAST_DTYPES.get(precision)
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = self.model(images, masks)
        losses = self.criterion(_float_outputs(outputs), targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.train_cfg.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                           self.train_cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {name: value.detach() for name, value in losses.items()}

    def _reduce_step(self, losses: dict[str, torch.Tensor], stop: bool) -> tuple[dict[str, float], bool]:
        """Loss terms averaged over ranks and whether any rank must stop, in one collective."""
        names = sorted(losses)
        values = torch.stack([losses[n].float().cpu() for n in names] + [torch.tensor(float(stop))])
        mean = distributed.all_reduce_mean(values)
        return {n: float(v) for n, v in zip(names, mean[:-1])}, bool(mean[-1] > 0)

    # ------------------------------------------------------------------ epoch
    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[int, Any]]:
        """This epoch's batches from batch `skip` on, with their index in the epoch."""
        sampler = self.train_loader.sampler
        sampler.set_epoch(epoch)
        total = len(self.train_loader)
        # Batches a stopped run already trained on are left out at the sampler: never read nor
        # augmented, so nothing draws from the random streams the checkpoint restored.
        sampler.skip(skip * self.train_loader.batch_size)
        batches: Iterable = enumerate(self.train_loader, start=skip)
        yield from progress(batches, total=total, initial=skip, unit="it",
                            desc=f"epoch {epoch} of 0..{self.train_cfg.num_epochs - 1}", enabled=self.info.is_main)

    def _train_epoch(self, position: Position, stop: StopRequest) -> bool:
        """Train one epoch from `position`; False when a SIGTERM stopped it early."""
        self.model.train()
        self.criterion.train()
        epoch = position.epoch
        waited_since = time.perf_counter()
        for index, (images, masks, targets) in self._batches(epoch, position.batches_done):
            started = time.perf_counter()
            data_wait = started - waited_since
            losses = self._train_step(images, masks, targets)
            reduced, stop_now = self._reduce_step(losses, stop.requested)
            position.step += 1
            position.batches_done = index + 1
            total = sum(reduced.values())
            position.loss_sum += total
            position.loss_steps += 1
            if not math.isfinite(total):
                raise FloatingPointError(f"training loss is {total} at epoch {epoch} (0-based), step {position.step}; "
                                         "lower train.optim.lr or use train.precision fp32")
            step_seconds = time.perf_counter() - waited_since
            self._record_step(position, reduced, len(targets) * self.info.world_size, step_seconds, data_wait)
            waited_since = time.perf_counter()
            if stop_now:
                return False
        return True

    def _record_step(self, position: Position, losses: dict[str, float], images: int, step_seconds: float,
                     data_wait: float) -> None:
        if not self.info.is_main:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        self.training_log.log_step(epoch=position.epoch, step=position.step, losses=losses, lr=lr,
                                   images_per_s=images / max(step_seconds, 1e-9), step_seconds=step_seconds,
                                   data_wait_seconds=data_wait, memory_mb=_peak_memory_mb(self.info.device))
        if self.metrics is not None:
            self.metrics.observe_step(epoch=position.epoch, step=position.step, losses=losses, lr=lr,
                                      images=images, step_seconds=step_seconds, data_wait_seconds=data_wait)

    # ------------------------------------------------------------- validation
    def _validate(self, position: Position) -> Optional[float]:
        """COCO mAP on val_data_sources (rank 0 scores what every rank predicted). Returns the
        validation loss, the same on every rank, when AutoReduce watches it; else None."""
        if self.val_loader is None:
            return None
        from ..data.coco_eval import evaluate_coco
        from .common import predict

        self.model.eval()
        # DDP's forward would sync buffers per batch and ranks may hold different batch counts:
        # predict with the bare module. FSDP2 must run every forward on every rank, and the loss
        # averages box counts over ranks in each batch: both pad the batch counts to the largest.
        model = self.model if self.sharded else distributed.unwrap_model(self.model)
        with_loss = self._watches_val_loss
        batches: Iterable = self.val_loader
        if self.sharded or (with_loss and self.info.distributed):
            batches = _padded_batches(self.val_loader, max(distributed.all_gather_objects(len(self.val_loader))))
        if with_loss:
            detections, val_loss = self._predict_with_loss(model, batches)
        else:
            detections, val_loss = predict(model, self.postprocessor, batches, self.info.device,
                                           show_progress=self.info.is_main), None
        gathered = distributed.all_gather_objects([d for d in detections if d["image_id"] >= 0])
        self.model.train()
        if not self.info.is_main:
            return val_loss
        results = sorted((d for part in gathered for d in part),
                         key=lambda d: (d["image_id"], -d["score"], d["category_id"]))
        scores = evaluate_coco(self.val_dataset.coco, results, class_ids=self.spec.dataset.eval_class_ids)
        metrics = {"mAP": scores["AP"], "mAP50": scores["AP50"], "mAP75": scores["AP75"],
                   "per_class_AP": scores["per_class"]}
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        self.training_log.log_validation(epoch=position.epoch, step=position.step, metrics=metrics)
        if self.metrics is not None:
            self.metrics.observe_validation({k: v for k, v in metrics.items() if k != "per_class_AP"})
        log.info("epoch %d: validation mAP %.4f (mAP50 %.4f)%s", position.epoch, metrics["mAP"],
                 metrics["mAP50"], "" if val_loss is None else f", loss {val_loss:.4f}")
        return val_loss

    @property
    def _watches_val_loss(self) -> bool:
        return monitors_a_value(self.scheduler) and self.train_cfg.optim.lr_monitor == "val_loss"

    def _predict_with_loss(self, model, batches: Iterable) -> tuple[list[dict], float]:
        """COCO results as `predict` gives them, and the loss per image over every rank (TAO's val_loss:
        the training loss, weighted alike, on validation images). Padding batches count for nothing."""
        from .common import to_coco_results

        device = self.info.device
        results: list[dict] = []
        loss_sum, images = 0.0, 0
        with torch.inference_mode():
            for batch_images, masks, targets in progress(batches, total=len(self.val_loader), desc="validate",
                                                         enabled=self.info.is_main):
                outputs = model(batch_images.to(device, non_blocking=True), masks.to(device, non_blocking=True))
                real = sum(1 for t in targets if int(t["image_id"]) >= 0)
                losses = self.criterion(_float_outputs(outputs), _to_device(targets, device))
                loss_sum += float(sum(losses.values())) * real
                images += real
                sizes = torch.stack([torch.as_tensor(t["orig_size"], dtype=torch.int64) for t in targets])
                for target, found in zip(targets, self.postprocessor(outputs, sizes.to(device))):
                    found = {name: value.detach().cpu() for name, value in found.items()}
                    results.extend(to_coco_results(int(torch.as_tensor(target["image_id"]).item()), found))
        total = distributed.all_reduce_mean(torch.tensor([loss_sum, float(images)], dtype=torch.float64))
        return results, float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def _step_on_plateau(self, position: Position, val_loss: Optional[float]) -> None:
        """AutoReduce: step with the monitored value; val_loss exists on validation epochs only."""
        name = self.train_cfg.optim.lr_monitor
        value = position.train_loss if name == "train_loss" else val_loss
        if value is None:
            return
        before = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(value)
        after = self.optimizer.param_groups[0]["lr"]
        if after < before and self.info.is_main:
            log.info("epoch %d: %s %.4f has not improved for %d checks: lr %g -> %g", position.epoch, name,
                     value, self.train_cfg.optim.patience + 1, before, after)

    # -------------------------------------------------------------------- fit
    def _prepare_folder(self) -> None:
        """Rank 0, first: remove partial writes a killed run left; upload what an earlier run could not."""
        if not self.info.is_main:
            return
        if self.remote:
            recover_staging(self.local_dir, self.results_dir)
            return
        removed = remove_partial_writes(self.local_dir)
        if removed:
            log.warning("removed %d partial file(s) a stopped run left in %s: %s", len(removed), self.local_dir,
                        ", ".join(sorted(removed)))

    def _open_outputs(self) -> None:
        """Rank 0, once the model, data and starting point are known: the run now owns status.json and
        the log. A resumed run continues them (a restarted pod downloads them); a fresh one starts anew."""
        if not self.info.is_main:
            return
        fresh = self.resumed_from is None
        os.makedirs(self.local_dir, exist_ok=True)
        for name in (LOG_NAME, STATUS_NAME):
            local = os.path.join(self.local_dir, name)
            if fresh:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(local)
            elif self.remote and storage.exists(f"{self.results_dir}/{name}"):
                storage.download(f"{self.results_dir}/{name}", local)
        self.training_log = TrainingLog(self.local_dir, self.train_cfg.num_epochs)
        self.metrics = _open_metrics(self.spec, self.info.is_main)

    def _record_failed_attempt(self, err: BaseException) -> None:
        """A run that failed before it started training leaves status.json (and the cli experiment.yaml)
        as the last run left them: the attempt is a record at the end of train_log.jsonl instead."""
        if not self.info.is_main or self.remote:
            return
        path = os.path.join(self.local_dir, LOG_NAME)
        if not os.path.isfile(path):
            return
        record = {"kind": "failed_attempt", "time": round(time.time(), 3), "error": _one_line(err),
                  "exit_code": distributed.exit_code_for(err)}
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as write_error:
            log.error("could not record the failed attempt in %s: %s", path, write_error)

    def _upload_logs(self) -> None:
        if self.info.is_main:
            self.sync.upload(LOG_NAME)
            self.sync.upload(STATUS_NAME)

    def _finish(self, state: str, error: Optional[BaseException] = None) -> None:
        if self.training_log is not None:
            try:
                self.training_log.update_status(state=state)
            except (UsageError, OSError) as err:  # a full disk: the training error is the one to surface
                if state != "failed":
                    raise
                log.error("also, status.json could not be updated: %s", _one_line(err))
            self.training_log.close()
            self._upload_logs()
        elif error is not None:
            self._record_failed_attempt(error)
        if self.metrics is not None:
            self.metrics.close()
        try:
            self.sync.close()  # raises when an upload failed for good: the staging copy is then kept
        except StorageError as err:
            kept = StorageError(f"{err}; kept in {self.local_dir}, which the next run with this results folder "
                                "uploads first", retryable=err.retryable)
            if state != "failed":
                raise kept from None
            # Training already failed: its error is the one to surface; the upload failure is logged.
            log.error("also, uploading the results failed: %s", kept)
            return
        if self.remote and state != "failed":  # everything is uploaded: the staging copy can go
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def fit(self) -> int:
        try:
            self._prepare_folder()
            # Every rank looks for its resume checkpoint only once rank 0 has uploaded what was staged.
            distributed.barrier()
            code, state = self._fit()
        except BaseException as err:
            self._finish("failed", err)
            raise
        self._finish(state)
        return code

    def _fit(self) -> tuple[int, str]:
        self._build()
        position, rng = self._resume()
        num_epochs = self.train_cfg.num_epochs
        self._open_outputs()
        if self.training_log is not None:
            self.training_log.update_status(epoch=position.epoch, epoch_index=position.epoch, step=position.step,
                                            state="running")
            # One per launch: a fresh run (resumed_from null) starts a fresh log.
            self.training_log.append("start", epoch=position.epoch, step=position.step,
                                     batches_done=position.batches_done, resumed_from=self.resumed_from,
                                     world_size=self.info.world_size, precision=self.train_cfg.precision,
                                     strategy=self.train_cfg.distributed_strategy)
        if self.train_cfg.is_dry_run:
            log.info("dry run: model, data and optimizer built; no step taken")
            return 0, "completed"
        self._restore_rng(rng)
        with StopRequest() as stop:
            while position.epoch < num_epochs:
                if self.metrics is not None:
                    self.metrics.set_epoch(position.epoch, num_epochs)
                if self.training_log is not None:
                    self.training_log.status.epoch_index = position.epoch
                finished = self._train_epoch(position, stop)
                if not finished:
                    self._save(position, epoch_finished=False)
                    log.warning("stopped by %s at epoch %d (0-based), batch %d, step %d", stop.signal_name,
                                position.epoch, position.batches_done, position.step)
                    return stop.exit_code, "stopped"
                on_plateau = monitors_a_value(self.scheduler)
                if not on_plateau:
                    self.scheduler.step()
                done = position.epoch + 1
                val_loss = None
                if done % self.train_cfg.validation_interval == 0 or done == num_epochs:
                    # Validation draws random numbers too; training must not depend on when it ran.
                    rng_before = checkpoint.capture_rng_state()
                    val_loss = self._validate(position)
                    checkpoint.restore_rng_state(rng_before)
                if on_plateau:  # after validation, before the checkpoint that holds the schedule's state
                    self._step_on_plateau(position, val_loss)
                if done % self.train_cfg.checkpoint_interval == 0 or done == num_epochs:
                    self._save(position, epoch_finished=True)
                self._log_epoch(position)
                position = Position(epoch=done, batches_done=0, step=position.step)
        return 0, "completed"

    def _log_epoch(self, position: Position) -> None:
        # A cheap guard that DDP replicas have not drifted apart (FSDP2 holds shards, not replicas).
        checksum = None
        if not self.sharded:
            with torch.no_grad():
                checksum = float(sum(p.detach().double().sum() for p in self.model.parameters()).item())
        checksums = distributed.all_gather_objects(checksum)
        if not self.info.is_main:
            return
        if not self.sharded and len(set(checksums)) > 1:
            log.warning("weights differ between ranks after epoch %d: %s", position.epoch, checksums)
        self.training_log.append("epoch", epoch=position.epoch, step=position.step,
                                 lr=self.optimizer.param_groups[0]["lr"], train_loss=position.train_loss,
                                 weight_checksums=checksums)
        self.training_log.update_status(epoch=position.epoch + 1, epoch_index=position.epoch, step=position.step)
        self._upload_logs()


def _padded_batches(loader: Iterable, count: int) -> Iterator[Any]:
    """`loader`'s batches, then copies of its last one (image_id -1, results dropped) up to `count`."""
    last = None
    seen = 0
    for batch in loader:
        last = batch
        seen += 1
        yield batch
    if seen >= count:
        return
    if last is None:  # this rank got no image at all: pad with the dataset's first image
        dataset = loader.dataset  # type: ignore[attr-defined]
        last = loader.collate_fn([dataset[0]])  # type: ignore[attr-defined]
    images, masks, targets = last
    padding = [{**t, "image_id": torch.tensor(-1)} for t in targets]
    for _ in range(count - seen):
        yield images, masks, padding
