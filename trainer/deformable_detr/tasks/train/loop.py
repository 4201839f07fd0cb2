"""The training loop of one worker: build model, data and optimizer, then epochs of steps with
validation and checkpoints between them (docs/architecture.md, "Train outputs")."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import resource
import time
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from ...config.schema import ExperimentConfig
from ...data.loader import SKIPPED_KEY
from ...errors import Diverged, UsageError
from ...runtime import checkpoint, distributed, watchdog
from ...runtime.logging import get_logger
from ...runtime.optim import build_optimizer, build_scheduler, monitors_a_value
from ...runtime.progress import progress
from ...runtime.quality_gates import gates_from_env
from ...runtime.signals import StopRequest, Stopped
from .batches import float_outputs, to_device
from .outputs import TrainOutputs
from .sample_record import SampleRecord
from .state import (Position, batch_plan, gather_checkpoint, load_resume_checkpoint, restore_rng, resume,
                    resume_path)
from .validation import Validation

log = get_logger("train")

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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


def _shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP2 units: each encoder and decoder layer (the bulk of the weights); the rest stays in the root."""
    transformer = getattr(model, "transformer", None)
    units: list[torch.nn.Module] = []
    for part in ("encoder", "decoder"):
        layers = getattr(getattr(transformer, part, None), "layers", None)
        units.extend(layers or [])
    return units


def _grouped(batches: Iterable, size: int) -> Iterator[list]:
    """`batches` in lists of `size` (the last one shorter when they run out)."""
    group: list = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class Trainer:
    """One worker's training: model, data, optimizer; rank 0's outputs go through `TrainOutputs`."""

    def __init__(self, spec: ExperimentConfig, info: distributed.DistInfo) -> None:
        self.spec, self.info, self.train_cfg = spec, info, spec.train
        _check_precision(self.train_cfg.precision, info.device)
        # train.cudnn: TAO sets torch's flags from the spec (benchmark off, deterministic on by default).
        torch.backends.cudnn.benchmark = self.train_cfg.cudnn.benchmark
        torch.backends.cudnn.deterministic = self.train_cfg.cudnn.deterministic
        self.outputs = TrainOutputs(spec, info.is_main)
        self.resumed_from: Optional[str] = None
        self.saved_at_step: Optional[int] = None  # the step of the newest checkpoint (finite weights)
        self.last_losses: dict[str, float] = {}
        self.skipped_images: set[str] = set()  # training images skipped since this launch, on any rank
        self.sample_record = SampleRecord(info.rank, info.world_size)
        self.gates = gates_from_env()  # runPolicy's target mAP and NaN tolerance (runtime/quality_gates.py)
        self.non_finite_steps = 0  # steps in a row whose loss was NaN or infinite
        self.epoch_map: Optional[float] = None  # this epoch's validation mAP (rank 0), for the best checkpoint

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        from ...data import build_dataloader, build_dataset
        from ...model import build_model

        spec, info = self.spec, self.info
        optim = self.train_cfg.optim
        if optim.lr_scheduler == "AutoReduce" and optim.lr_monitor == "val_loss" and not spec.dataset.val_data_sources:
            raise UsageError("train.optim.lr_monitor: val_loss needs dataset.val_data_sources (AutoReduce watches "
                             "the validation loss); give validation data or set train.optim.lr_monitor: train_loss")
        # The same seed on every rank gives every rank the same initial weights (FSDP2 shards them as they are).
        torch.manual_seed(self.train_cfg.seed)
        model, self.criterion, postprocessor = build_model(spec)
        self._load_pretrained(model)
        self.model = distributed.wrap_model(model, self.train_cfg.distributed_strategy, info,
                                            shard_units=_shard_units(model))
        self.criterion.to(info.device)
        self.optimizer = build_optimizer(self._bare_model, spec)
        self.scheduler = build_scheduler(self.optimizer, self.train_cfg.optim)
        fp16 = self.train_cfg.precision == "fp16"
        if fp16 and self.sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler(info.device.type)
        else:
            self.scaler = torch.amp.GradScaler(info.device.type, enabled=fp16)
        train_set = build_dataset(spec, "train")
        if spec.dataset.verify_images:
            self._verify_images(train_set)
        # The loader's batch is the per-rank micro-batch of the run's global batch (state.batch_plan).
        per_rank = dataclasses.replace(spec, dataset=dataclasses.replace(spec.dataset, batch_size=self.plan.per_rank))
        self.train_loader = build_dataloader(per_rank, "train", rank=info.rank, world_size=info.world_size,
                                             dataset=train_set)
        self.num_train_images = len(train_set)
        if len(self.train_loader) == 0:
            raise UsageError("dataset.train_data_sources: no training batch for this process; "
                             "use more images or fewer processes")
        self.validation = None
        if spec.dataset.val_data_sources:
            dataset = build_dataset(spec, "val")
            loader = build_dataloader(spec, "val", rank=info.rank, world_size=info.world_size, dataset=dataset)
            self.validation = Validation(spec, info, self.criterion, postprocessor, dataset, loader)
        # Per-rank randomness from here on (dropout, augmentation in the main process).
        _seed_everything(self.train_cfg.seed + info.rank)

    def _verify_images(self, dataset) -> None:
        """dataset.verify_images: every image decoded and its size checked before the first step (each rank
        a share); any unusable one refuses the run on every rank, in one line."""
        info = self.info
        problems = dataset.unusable_images(range(info.rank, len(dataset), info.world_size),
                                           show_progress=info.is_main)
        problems = [line for part in distributed.all_gather_objects(problems) for line in part]
        if problems:
            raise UsageError(f"dataset.verify_images: {len(problems)} of {len(dataset)} training images cannot be "
                             f"used: {'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}; fix or "
                             "remove them (or set dataset.verify_images: false to skip them as they are read, up "
                             f"to dataset.max_skipped_share)")
        log.info("dataset.verify_images: all %d training images can be used", len(dataset))

    def _note_skipped(self, position: Position, skipped: list[str]) -> None:
        """Every rank, on a step where some rank skipped an image: count the files (the same set on every
        rank), report them, and stop past dataset.max_skipped_share, after saving a checkpoint."""
        new = {path for part in distributed.all_gather_objects(skipped) for path in part} - self.skipped_images
        self.skipped_images |= new
        self.outputs.images_skipped(position, sorted(new), len(self.skipped_images))
        share = self.spec.dataset.max_skipped_share
        if len(self.skipped_images) <= share * self.num_train_images:
            return
        self._save(position, epoch_finished=False)
        raise UsageError(f"dataset.max_skipped_share: {len(self.skipped_images)} of {self.num_train_images} "
                         f"training images could not be used, more than the {share:.0%} allowed (first: "
                         f"{sorted(self.skipped_images)[0]}); fix or remove them, or raise "
                         f"dataset.max_skipped_share; saved a checkpoint at epoch {position.epoch} (0-based), "
                         f"step {position.step}")

    @property
    def _bare_model(self) -> torch.nn.Module:
        # State dicts go through the module itself: torch.distributed.checkpoint maps the names of
        # modules shared under two paths (bbox_embed) wrongly under a DDP wrapper.
        return distributed.unwrap_model(self.model)

    @property
    def sharded(self) -> bool:
        return self.info.distributed and self.train_cfg.distributed_strategy == "ddp_sharded"

    def _load_pretrained(self, model: torch.nn.Module) -> None:
        path = self.train_cfg.pretrained_model_path
        if not path or resume_path(self.spec, self.outputs.results_dir) is not None:
            return
        from ...model.checkpoint_compat import load_model_state
        from ...runtime.checkpoint_io import load_object

        try:
            load_model_state(model, load_object(path, self.spec.encryption_key), allow_num_classes_change=True)
        except UsageError as err:
            raise UsageError(f"train.pretrained_model_path: {err}") from None
        log.info("fine-tuning from %s", path)

    # ------------------------------------------------------------ checkpoint
    def _save(self, position: Position, epoch_finished: bool) -> Optional[str]:
        """Every rank gathers; rank 0 writes. Returns the checkpoint's name in the results folder on rank 0."""
        if not self._weights_finite():  # a finite loss can still leave non-finite weights after its update
            terms = ", ".join(f"{name} {value:.4g}" for name, value in self.last_losses.items())
            raise Diverged(f"training diverged at epoch {position.epoch} (0-based), step {position.step}: the "
                           f"weights are no longer finite (last loss terms: {terms}); {self._saved_note()}; "
                           "lower train.optim.lr (or use train.precision fp32)")
        started = time.perf_counter()
        state = gather_checkpoint(self.spec, self._bare_model, self.optimizer, self.scheduler, self.scaler,
                                  position, epoch_finished, self.info, self.plan)
        self.saved_at_step = position.step
        if state is None:
            return None
        # With remote results the sync moves the remote latest once the upload is complete; a local
        # latest in the staging folder would only keep a checkpoint's bytes on the pod's disk.
        path = checkpoint.save_checkpoint(state, self.outputs.local_dir, key=self.spec.encryption_key,
                                          update_latest=not self.outputs.remote)
        shown = self.outputs.checkpoint_saved(path)
        self.outputs.add_time("checkpoint_seconds", time.perf_counter() - started)
        if epoch_finished and self.epoch_map is not None:  # these weights are the ones validation just scored
            self.outputs.best_candidate(shown, position.epoch, self.epoch_map)
        return shown

    def _weights_finite(self) -> bool:
        """Whether every rank's weights (its shard under FSDP2) are finite; a collective."""
        with torch.no_grad():
            bad = any(not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                      for p in self._bare_model.parameters())
        return float(distributed.all_reduce_mean(torch.tensor([float(bad)]))[0]) == 0.0

    def _saved_note(self) -> str:
        if self.saved_at_step is None:
            return "this run saved no checkpoint"
        return f"the newest checkpoint is from step {self.saved_at_step}, nothing later was saved"

    # ------------------------------------------------------------------- step
    def _train_step(self, micro_batches: list) -> dict[str, torch.Tensor]:
        """One optimizer step over one global batch: this rank's micro-batches (several when the run
        resumed on fewer processes; runtime/batch_plan.py). Their loss terms add up, each normalised
        by the step's boxes per rank, so that the step's gradient is the one a single batch per rank
        would give."""
        device, precision = self.info.device, self.train_cfg.precision
        dtype = AUTOCAST_DTYPES.get(precision)
        boxes = sum(len(t["labels"]) for _, _, batch in micro_batches for t in batch)
        num_boxes = max(float(distributed.all_reduce_mean(torch.tensor([float(boxes)]))[0]), 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        losses: dict[str, torch.Tensor] = {}
        for number, (images, masks, targets) in enumerate(micro_batches):
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            targets = to_device(targets, device)
            # DDP reduces gradients once, after the step's last micro-batch.
            last = number == len(micro_batches) - 1
            with contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
                with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    outputs = self.model(images, masks)
                terms = self.criterion(float_outputs(outputs), targets, num_boxes=num_boxes)
                self.scaler.scale(sum(terms.values())).backward()
            losses = {name: losses.get(name, 0) + value.detach() for name, value in terms.items()}
        grad_norm = None
        if self.train_cfg.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                       self.train_cfg.clip_grad_norm)
        if self.gates.max_non_finite_steps > 1 and not self.scaler.is_enabled():
            # NaN losses are tolerated for a few steps: their updates must not reach the weights. The norm
            # is the same on every rank (gradients are reduced), so all ranks skip together. fp16's
            # GradScaler skips such updates itself.
            if grad_norm is None:
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters()
                                                            if p.grad is not None], float("inf"))
            if not bool(torch.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                return {name: value.detach() for name, value in losses.items()}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {name: value.detach() for name, value in losses.items()}

    def _reduce_step(self, losses: dict[str, torch.Tensor], stop: bool,
                     skipped: int) -> tuple[dict[str, float], bool, bool]:
        """Loss terms averaged over ranks, whether any rank must stop and whether any rank skipped an
        image, in one collective."""
        names = sorted(losses)
        values = torch.stack([losses[n].float().cpu() for n in names]
                             + [torch.tensor(float(stop)), torch.tensor(float(skipped))])
        mean = distributed.all_reduce_mean(values)
        return {n: float(v) for n, v in zip(names, mean[:-2])}, bool(mean[-2] > 0), bool(mean[-1] > 0)

    # ------------------------------------------------------------------ epoch
    def _batches(self, position: Position) -> Iterator[tuple[int, Any]]:
        """This epoch's steps from `position` on, with their index in the epoch: each a list of
        micro-batches (one, unless the run resumed on fewer processes)."""
        sampler, epoch = self.train_loader.sampler, position.epoch
        sampler.set_epoch(epoch)
        # Samples a stopped run already trained on are left out at the sampler: never read nor
        # augmented, so nothing draws from the random streams the checkpoint restored.
        sampler.continue_at(position.epoch_samples, position.epoch_world_size or self.info.world_size)
        skip = position.batches_done
        total = skip + math.ceil(len(self.train_loader) / self.plan.accumulation)
        batches: Iterable = enumerate(_grouped(self.train_loader, self.plan.accumulation), start=skip)
        yield from progress(batches, total=total, initial=skip, unit="it",
                            desc=f"epoch {epoch} of 0..{self.train_cfg.num_epochs - 1}", enabled=self.info.is_main,
                            note=self.outputs.progress_note)

    def _train_epoch(self, position: Position, stop: StopRequest) -> bool:
        """Train one epoch from `position`; False when a SIGTERM stopped it early."""
        self.model.train()
        self.criterion.train()
        epoch = position.epoch
        waited_since = time.perf_counter()
        read = 0  # samples this rank read since the epoch (re)started here
        for index, micro_batches in self._batches(position):
            started = time.perf_counter()
            data_wait = started - waited_since
            losses = self._train_step(micro_batches)
            targets = [target for _, _, batch in micro_batches for target in batch]
            skipped = [path for target in targets for path in target.get(SKIPPED_KEY, ())]
            reduced, stop_now, any_skipped = self._reduce_step(losses, stop.requested, len(skipped))
            position.step += 1
            watchdog.beat(position.step)
            position.batches_done = index + 1
            read += len(targets)
            self.sample_record.step(epoch, position.step, targets)
            position.epoch_samples = self.train_loader.sampler.samples_done(read)
            total = sum(reduced.values())
            finite = math.isfinite(total)
            self._check_finite(position, total, reduced)
            if finite:
                position.loss_sum += total
                position.loss_steps += 1
                self.last_losses = reduced
            step_seconds = time.perf_counter() - waited_since
            self.outputs.step(position, reduced, self.optimizer.param_groups[0]["lr"],
                              len(targets) * self.info.world_size, step_seconds, data_wait,
                              _peak_memory_mb(self.info.device),
                              group_lrs={group.get("name", str(number)): group["lr"]
                                         for number, group in enumerate(self.optimizer.param_groups)})
            waited_since = time.perf_counter()
            if any_skipped:
                self._note_skipped(position, skipped)
            if stop_now:
                return False
            if finite and self.train_cfg.checkpoint_interval_unit == "step" and \
                    position.step % self.train_cfg.checkpoint_interval == 0:
                self._save(position, epoch_finished=False)  # the epoch's schedule step and validation still to come
        return True

    def _check_finite(self, position: Position, total: float, reduced: dict[str, float]) -> None:
        """A NaN/inf loss fails the run (Diverged, exit 4, not retried) once it lasted the gate's steps in a row
        (every rank sees the same reduced terms, so all stop here together)."""
        if math.isfinite(total):
            self.non_finite_steps = 0
            return
        self.non_finite_steps += 1
        limit = self.gates.max_non_finite_steps
        terms = ", ".join(f"{name} {value:.4g}" for name, value in reduced.items())
        if self.non_finite_steps < limit:
            if self.info.is_main:
                log.warning("step %d: loss %s (%s), %d of %d steps in a row allowed; its update is skipped",
                            position.step, total, terms, self.non_finite_steps, limit)
            return
        run = "" if limit == 1 else f" for {limit} steps in a row (from step {position.step - limit + 1})"
        raise Diverged(f"training diverged at epoch {position.epoch} (0-based), step {position.step}: loss {total} "
                       f"({terms}){run}; {self._saved_note()}; lower train.optim.lr (or use train.precision fp32)")

    def _validate(self, position: Position) -> Optional[float]:
        """Validation's loss (the same on every rank) when AutoReduce watches it, else None."""
        if self.validation is None:
            return None
        with_loss = monitors_a_value(self.scheduler) and self.train_cfg.optim.lr_monitor == "val_loss"
        started = time.perf_counter()
        metrics, val_loss = self.validation.run(self.model, self.sharded, with_loss)
        self.outputs.add_time("eval_seconds", time.perf_counter() - started)
        self.epoch_map = None if metrics is None else metrics.get("mAP")
        if metrics is not None:
            self.outputs.validation(position, metrics)
            log.info("epoch %d: validation mAP %.4f (mAP50 %.4f)%s", position.epoch, metrics["mAP"],
                     metrics["mAP50"], "" if val_loss is None else f", loss {val_loss:.4f}")
        return val_loss

    def _target_reached(self, position: Position) -> bool:
        """runPolicy.targetMap: whether this epoch's validation reached it (rank 0's mAP, shared with every rank)."""
        if self.gates.target_map is None or self.validation is None:
            return False
        reached = distributed.broadcast_object(self.gates.target_reached(self.epoch_map))
        if reached and self.info.is_main:
            self.outputs.target_reached(position, self.epoch_map, self.gates.target_map)
        return bool(reached)

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
        self.outputs.epoch_done(position, self.optimizer.param_groups[0]["lr"], checksums)

    # -------------------------------------------------------------------- fit
    def fit(self) -> int:
        try:
            self.outputs.prepare()
            # Every rank looks for its resume checkpoint only once rank 0 has uploaded what was staged.
            distributed.barrier()
            with watchdog.guard(self.train_cfg.step_timeout_s, self.outputs.results_dir, self.info.rank):
                code, state = self._fit()
        except BaseException as err:  # a signal before or after the loop: stopped, not failed
            self.outputs.finish("stopped" if isinstance(err, Stopped) else "failed", err)
            raise
        self.outputs.finish(state)
        return code

    def _fit(self) -> tuple[int, str]:
        path, state = load_resume_checkpoint(self.spec, self.outputs.results_dir)
        self.plan = batch_plan(self.spec, state, path, self.info.world_size)
        self._build()
        position, rng, self.resumed_from = resume(self.spec, path, state, self._bare_model,
                                                  self.optimizer, self.scheduler, self.scaler)
        num_epochs = self.train_cfg.num_epochs
        if self.resumed_from is not None:
            self.saved_at_step = position.step
        self.outputs.open(self.resumed_from)
        self.outputs.start(position, self.resumed_from, self.info.world_size,
                           math.ceil(len(self.train_loader) / self.plan.accumulation))
        if self.train_cfg.is_dry_run:
            log.info("dry run: model, data and optimizer built; no step taken")
            return 0, "completed"
        restore_rng(rng, self.info)
        with StopRequest() as stop:
            while position.epoch < num_epochs:
                self.outputs.epoch_started(position.epoch)
                if not self._train_epoch(position, stop):
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
                reached = self._target_reached(position)
                by_epoch = self.train_cfg.checkpoint_interval_unit == "epoch"
                if (by_epoch and done % self.train_cfg.checkpoint_interval == 0) or done == num_epochs or reached:
                    self._save(position, epoch_finished=True)
                self.epoch_map = None
                self._log_epoch(position)
                if reached:
                    return 0, "completed"
                position = Position(epoch=done, batches_done=0, step=position.step)
        return 0, "completed"
