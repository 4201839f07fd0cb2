"""Training's resumable state: where training stands (`Position`), what a checkpoint holds, and
resuming from one exactly (docs/architecture.md, "Train outputs", says which checkpoint is chosen)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ...config.loader import spec_to_dict
from ...config.schema import ExperimentConfig
from ...errors import UsageError
from ...runtime import checkpoint, distributed
from ...runtime.batch_plan import BatchPlan, plan_batches
from ...runtime.logging import get_logger
from ...runtime.optim import monitors_a_value

log = get_logger("train")


@dataclasses.dataclass
class Position:
    """Where training stands: the epoch in progress, optimizer steps of it done (each one global
    batch), optimizer steps overall, the sum of this epoch's step losses so far (its mean is
    `train_loss` for AutoReduce), and the samples of the epoch's global order done, the epoch
    having been dealt to `epoch_world_size` processes (0: this run's; data/samplers.py)."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    epoch_samples: int = 0
    epoch_world_size: int = 0

    @property
    def train_loss(self) -> Optional[float]:
        return self.loss_sum / self.loss_steps if self.loss_steps else None


def check_resume(spec: ExperimentConfig, state: dict, path: str) -> None:
    """Before resuming from `state` (a training checkpoint read from `path`): the same network, and epochs left.

    A checkpoint already past train.num_epochs would make the run a silent no-op, so it is refused.
    """
    from ...model.checkpoint_compat import check_architecture

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


def resume_path(spec: ExperimentConfig, results_dir: str) -> Optional[str]:
    """The checkpoint a run would resume from (without reading it), or None for a fresh start."""
    if spec.train.resume_training_checkpoint_path:
        return spec.train.resume_training_checkpoint_path
    if spec.train.auto_resume:
        return checkpoint.find_resume_checkpoint(results_dir)
    return None


def load_resume_checkpoint(spec: ExperimentConfig, results_dir: str) -> tuple[Optional[str], Optional[dict]]:
    """(path, state) of the checkpoint to resume from; auto_resume skips unreadable ones, saying which."""
    if spec.train.resume_training_checkpoint_path:
        path = spec.train.resume_training_checkpoint_path
        return path, checkpoint.load_checkpoint(path, spec.encryption_key)
    if not spec.train.auto_resume:
        return None, None
    found = checkpoint.load_newest_readable(results_dir, spec.encryption_key)
    if found is None:
        return None, None
    path, state, skipped = found
    for bad, reason in skipped:
        log.warning("auto_resume: skipping %s, which cannot be read (%s); resuming from %s", bad, reason, path)
    return path, state


def saved_world_size(state: dict) -> int:
    """The number of processes that wrote a training checkpoint (one RNG state each)."""
    return int(state.get("world_size") or len((state.get("rng") or {}).get("ranks") or [None]))


def batch_plan(spec: ExperimentConfig, state: Optional[dict], path: Optional[str], world_size: int) -> BatchPlan:
    """How this run takes its global batch: the one it started with (the checkpoint's), on `world_size`
    processes of at most dataset.batch_size images each (runtime/batch_plan.py)."""
    per_rank = spec.dataset.batch_size
    if state is None:
        return plan_batches(per_rank * world_size, world_size, per_rank)
    saved_world = saved_world_size(state)
    global_batch = int(state.get("global_batch") or per_rank * saved_world)
    try:
        plan = plan_batches(global_batch, world_size, per_rank)
    except ValueError as err:
        raise UsageError(f"world size: resuming {path} with {world_size} process(es): {err}") from None
    if world_size != saved_world or plan.accumulation > 1:
        log.info("resuming at world size %d (the checkpoint's: %d): %s", world_size, saved_world, plan.describe())
    return plan


def resume(spec: ExperimentConfig, path: Optional[str], state: Optional[dict], model: torch.nn.Module, optimizer,
           scheduler, scaler) -> tuple[Position, Optional[dict], Optional[str]]:
    """Load the resume checkpoint `state` (read from `path` by `load_resume_checkpoint`) into the bare
    `model`, optimizer, schedule and scaler; (position, RNG states, the checkpoint's path) or a fresh
    Position when there is none."""
    if path is None or state is None:
        return Position(), None, None
    check_resume(spec, state, path)  # same network, and epochs left to train
    missing = [k for k in ("model", "optimizer", "lr_scheduler", "epoch", "step") if k not in state]
    if missing:
        raise UsageError(f"train.resume_training_checkpoint_path: {path} is not a training checkpoint "
                         f"(missing {', '.join(missing)}); use train.pretrained_model_path to fine-tune from it")
    saved_on_plateau = "best" in state["lr_scheduler"]  # ReduceLROnPlateau's state has its best value
    if saved_on_plateau != monitors_a_value(scheduler):
        raise UsageError(f"train.optim.lr_scheduler: {path} was trained with "
                         f"{'AutoReduce' if saved_on_plateau else 'MultiStep or StepLR'}, this spec asks for "
                         f"{spec.train.optim.lr_scheduler}; resume with the spec it was trained with")
    try:
        checkpoint.load_model_and_optimizer(model, optimizer, state["model"], state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"train.resume_training_checkpoint_path: {path} does not fit the model and optimizer "
                         f"built from this spec ({first_line}); resume with the spec it was trained with") from None
    from ...model.checkpoint_compat import apply_attention_padding

    apply_attention_padding(model, state)  # as it was trained (an explicit model.attention_padding wins)
    scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state.get("epoch_finished", True):
        position = Position(epoch=int(state["epoch"]) + 1, batches_done=0, step=int(state["step"]))
    else:
        epoch_loss = state.get("epoch_loss") or {}
        batches_done, saved_world = int(state.get("batches_done", 0)), saved_world_size(state)
        # (Checkpoints from before resizing: every process had read batches_done full batches.)
        samples = state.get("epoch_samples_done", batches_done * spec.dataset.batch_size * saved_world)
        position = Position(epoch=int(state["epoch"]), batches_done=batches_done,
                            step=int(state["step"]), loss_sum=float(epoch_loss.get("sum", 0.0)),
                            loss_steps=int(epoch_loss.get("steps", 0)), epoch_samples=int(samples),
                            epoch_world_size=int(state.get("epoch_world_size") or saved_world))
    log.info("resuming from %s: epoch %d (0-based), batch %d, step %d", path, position.epoch,
             position.batches_done, position.step)
    return position, state.get("rng"), path


def restore_rng(rng: Optional[dict], info: distributed.DistInfo) -> None:
    """Each rank's random streams as the checkpoint saved them (afresh when the world size changed)."""
    if not rng:
        return
    per_rank = rng.get("ranks", [])
    if len(per_rank) == info.world_size:
        checkpoint.restore_rng_state(per_rank[info.rank])
    else:
        log.warning("checkpoint saved by %d process(es), now %d: random streams start afresh",
                    len(per_rank), info.world_size)


def gather_checkpoint(spec: ExperimentConfig, model: torch.nn.Module, optimizer, scheduler, scaler,
                      position: Position, epoch_finished: bool, info: distributed.DistInfo,
                      plan: BatchPlan) -> Optional[dict[str, Any]]:
    """What a training checkpoint holds; every rank gathers (collectives for FSDP2), rank 0 gets it, others None."""
    model_state = checkpoint.gather_model_state(model)
    optimizer_state = checkpoint.gather_optimizer_state(model, optimizer)
    rng_states = distributed.all_gather_objects(checkpoint.capture_rng_state())
    if not info.is_main:
        return None
    return {
        "model": model_state, "optimizer": optimizer_state, "lr_scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": position.epoch, "step": position.step, "batches_done": position.batches_done,
        "epoch_finished": epoch_finished, "rng": {"ranks": rng_states},
        "epoch_loss": {"sum": position.loss_sum, "steps": position.loss_steps},
        # What a run at another world size continues from (data/samplers.py, runtime/batch_plan.py).
        "world_size": info.world_size, "global_batch": plan.global_batch,
        "epoch_samples_done": position.epoch_samples,
        "epoch_world_size": position.epoch_world_size or info.world_size,
        # The attention padding the weights were trained with, resolved (never auto): how they must be run.
        "spec": spec_to_dict(dataclasses.replace(spec, encryption_key=None, model=dataclasses.replace(
            spec.model, attention_padding=model.attention_padding))),
    }
