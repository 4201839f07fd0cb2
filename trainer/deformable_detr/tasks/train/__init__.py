"""`deformable-detr train`: Deformable DETR training, one process to a multi-node torchrun gang.

The loop (loop.py), its resumable state (state.py), rank 0's results folder (outputs.py) and
validation (validation.py); what training writes, resumes and exits with: docs/architecture.md.
"""
from __future__ import annotations

from ...config.schema import ExperimentConfig
from ...errors import one_line
from ...runtime import distributed, watchdog
from ...runtime.files import disk_full_error, is_disk_full
from ...runtime.logging import get_logger
from ...runtime.paths import task_results_dir
from ..devices import select_gpus
from .loop import Trainer

log = get_logger("train")

__all__ = ["Trainer", "run"]


def run(spec: ExperimentConfig) -> int:
    # train.gpu_ids: this node's GPUs, reconciled with train.num_gpus as TAO does (tasks/devices.py).
    num_gpus = select_gpus("train", spec.train.num_gpus, spec.train.gpu_ids)
    watchdog.collective_timeout_from(spec.train.step_timeout_s)
    launched = distributed.relaunch_in_workers(spec, "train", num_gpus, spec.train.num_nodes)
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
                  one_line(err), code)
        return code
    finally:
        distributed.cleanup()
    distributed.record_exit_code(code)
    return code
