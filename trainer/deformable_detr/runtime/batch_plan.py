"""The global batch kept when a run resumes at another world size (a job resized while suspended).

A run's global batch is fixed when it starts: dataset.batch_size images per process times its
processes. Resumed with fewer or more processes, each optimizer step still takes that many images:
a process reads at most dataset.batch_size images at once (what is known to fit in its memory) and
accumulates gradients over several such micro-batches when it must take more. The trainer and
the operator (which states the plan in the job's status) both read `plan_batches`.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # images per optimizer step, all processes together
    world_size: int
    per_rank: int  # images per forward pass of one process (the loader's batch)
    accumulation: int  # micro-batches per optimizer step

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world_size} process(es) x per-rank batch "
                f"{self.per_rank} x gradient accumulation {self.accumulation}")


def plan_batches(global_batch: int, world_size: int, max_per_rank: int) -> BatchPlan:
    """The largest per-rank batch up to `max_per_rank` that, with whole accumulation steps, makes
    `global_batch` on `world_size` processes; ValueError when `world_size` does not divide it."""
    if global_batch % world_size:
        accepted = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise ValueError(f"the run's global batch is {global_batch} images per step, which {world_size} "
                         f"process(es) cannot share evenly; accepted world sizes (nodes x GPUs per node): "
                         f"{', '.join(map(str, accepted))}")
    share = global_batch // world_size
    per_rank = max(d for d in range(1, min(share, max_per_rank) + 1) if share % d == 0)
    return BatchPlan(global_batch, world_size, per_rank, share // per_rank)
