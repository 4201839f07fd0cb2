"""A job resized while suspended (spec.nodes, spec.gpusPerNode): the attempt that resumes runs at the
new world size, from the newest checkpoint, keeping the run's global batch (per-rank batch and
gradient accumulation from runtime/batch_plan.py, the trainer's own rule, stated in status and
an event). A suspended worker Job cannot change size (its pod template names the gang), so a
resized resume is a new attempt."""
from __future__ import annotations

from deformable_detr.runtime.batch_plan import BatchPlan, plan_batches
from deformable_detr.tasks import DEFAULT_TASK

from .. import api
from ..validate import effective_experiment
from .model import Event, State, timestamp


def world_size(spec: api.JobSpec) -> int:
    """torchrun processes of a gang: nodes x GPUs per node (0 GPUs: one CPU process per node)."""
    return spec.nodes * max(spec.gpus_per_node, 1)


def resized(s: State) -> bool:
    """Whether the spec asks for another world size than the current attempt's."""
    before = s.status.get("worldSize")
    return before is not None and before != world_size(s.job.spec)


def _plan(s: State, world: int) -> BatchPlan | None:
    if s.job.spec.task != DEFAULT_TASK:
        return None
    per_rank = effective_experiment(s.job.spec).dataset.batch_size
    global_batch = (s.status.get("batchPlan") or {}).get("globalBatch") or per_rank * world
    return plan_batches(int(global_batch), world, per_rank)


def plan_attempt(s: State) -> str | None:
    """Before creating an attempt: record its world size and batch plan (and the resize, from -> to,
    in status.lastResize and an event). None when it may start, else why not (a world size that
    cannot share the run's global batch)."""
    world, before = world_size(s.job.spec), s.status.get("worldSize")
    try:
        plan = _plan(s, world)
    except ValueError as err:
        return f"spec.nodes x spec.gpusPerNode = {world}: {err}; suspend the job and set spec.nodes back"
    s.status["worldSize"] = world
    if plan is not None:
        s.status["batchPlan"] = {"globalBatch": plan.global_batch, "perRankBatch": plan.per_rank,
                                 "gradientAccumulation": plan.accumulation}
    if before is not None and before != world:
        s.status["lastResize"] = {"fromWorldSize": before, "toWorldSize": world, "time": timestamp(s.now)}
        detail = f": {plan.describe()}" if plan is not None else ""
        s.events.append(Event("Normal", "Resized", f"world size {before} -> {world} (spec.nodes "
                                                   f"{s.job.spec.nodes}, gpusPerNode {s.job.spec.gpus_per_node}), "
                                                   f"resuming from the newest checkpoint{detail}"))
    return None
