"""Which GPUs a task runs on: `{task}.gpu_ids` with `{task}.num_gpus` (train: on each node), as TAO reads them.

TAO reconciles the two (the larger count wins; when the number of ids then differs from it, the
ids become 0..N-1) and makes the chosen GPUs the only visible ones (CUDA_VISIBLE_DEVICES), so
each worker's `cuda:<local rank>` is one of them; ids 0..N-1 are that already, and leave the
environment alone. Where CUDA_VISIBLE_DEVICES is set already (a container given some of a
node's GPUs), the ids index into that list.
"""
from __future__ import annotations

import os
from typing import MutableMapping, Sequence

from ..errors import UsageError
from ..runtime.logging import get_logger

log = get_logger("tasks")

VISIBLE = "CUDA_VISIBLE_DEVICES"
NVIDIA_VISIBLE = "NVIDIA_VISIBLE_DEVICES"  # the GPUs a device plugin gave the container


def reconcile_gpus(num_gpus: int, gpu_ids: Sequence[int]) -> list[int]:
    """TAO's rule: the GPU ids to use, given `num_gpus` and `gpu_ids` that may disagree."""
    ids = list(gpu_ids)
    if num_gpus != len(ids):
        count = max(num_gpus, len(ids))
        ids = ids if len(ids) == count else list(range(count))
    return ids


def select_gpus(task: str, num_gpus: int, gpu_ids: Sequence[int], num_nodes: int = 1,
                environ: MutableMapping[str, str] = os.environ) -> int:
    """Make `{task}.gpu_ids` the visible GPUs (before CUDA starts); returns the number of processes to run.

    Workers this process starts inherit the selection; a process that torchrun started leaves it
    as its parent set it.
    """
    count = _select_gpus(task, num_gpus, gpu_ids, num_nodes, environ)
    say_if_given_gpus_without_cuda(task, environ)
    return count


def say_if_given_gpus_without_cuda(task: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """A container given GPUs (NVIDIA_VISIBLE_DEVICES, set by a device plugin) in which CUDA sees
    none (no NVIDIA driver or device files in it): one line, then the task runs on the CPU, as it
    does anywhere without CUDA. Said once, by the process that selects (not by torchrun's workers)."""
    given = environ.get(NVIDIA_VISIBLE, "").strip()
    if given in ("", "void", "none") or "RANK" in environ:
        return False
    import torch
    if torch.cuda.is_available():
        return False
    log.warning("%s: %s=%s names GPU(s), but no CUDA device is visible (no NVIDIA driver or device "
                "in this container): running on the CPU", task, NVIDIA_VISIBLE, given)
    return True


def _select_gpus(task: str, num_gpus: int, gpu_ids: Sequence[int], num_nodes: int,
                 environ: MutableMapping[str, str]) -> int:
    if num_nodes != 1:
        raise UsageError(f"{task}.num_nodes: {num_nodes}; {task} runs on one node; accepted: 1")
    ids = reconcile_gpus(num_gpus, gpu_ids)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return len(ids)
    if ids != list(gpu_ids) or len(ids) != num_gpus:
        log.warning("%s.num_gpus %d and %s.gpu_ids %s disagree: using GPUs %s", task, num_gpus, task,
                    list(gpu_ids), ids)
    if ids == list(range(len(ids))):
        return len(ids)  # the first N GPUs: what worker k's cuda:k is already (the environment stays as it is)
    given = environ.get(VISIBLE)
    if given is not None and given.strip():
        visible = [part.strip() for part in given.split(",") if part.strip()]
        outside = [i for i in ids if i >= len(visible)]
        if outside:
            raise UsageError(f"{task}.gpu_ids: {ids} but {len(visible)} GPU(s) are visible "
                             f"({VISIBLE}={given}); accepted: ids 0..{len(visible) - 1}")
        chosen = [visible[i] for i in ids]
    else:
        chosen = [str(i) for i in ids]
    environ[VISIBLE] = ",".join(chosen)
    return len(ids)
