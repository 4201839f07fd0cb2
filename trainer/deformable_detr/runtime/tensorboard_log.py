"""TensorBoard event files of a training run, written by rank 0 beside train_log.jsonl (the folder
`tensorboard/` of the train results, uploaded with them) from the same scalars as Weights & Biases
(runtime/scalars.py). The writer is torch's (`torch.utils.tensorboard`), which needs the `tensorboard`
package, an optional extra (`pip install './trainer[tensorboard]'`; the trainer image has it): without it,
one line, and training goes on without event files."""
from __future__ import annotations

import os
from typing import Mapping, Optional

from .logging import get_logger

log = get_logger("tensorboard")
EVENTS_DIR = "tensorboard"  # under the train results folder


class TensorBoardRun:
    """One launch's event file. `purge_from_step` (this launch's first step): TensorBoard drops the points
    of earlier files from that step on (recomputed after a resume, or an earlier run's), so each curve shows
    every step once."""

    def __init__(self, folder: str, purge_from_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = os.path.join(folder, EVENTS_DIR)
        self.writer = SummaryWriter(self.folder, purge_step=purge_from_step, flush_secs=30)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def files(self) -> list[str]:
        """The event files in the folder (relative to the train results folder), flushed to disk."""
        self.writer.flush()
        return sorted(os.path.join(EVENTS_DIR, name) for name in os.listdir(self.folder))

    def close(self) -> None:
        self.writer.close()


def open_events(folder: str, purge_from_step: int) -> Optional[TensorBoardRun]:
    """Rank 0's event writer under `folder` (the local train results or their staging copy), or None
    without the tensorboard package."""
    try:
        import tensorboard  # noqa: F401  (torch's writer needs it)
    except ImportError:
        log.info("no TensorBoard event files: the tensorboard package is not installed "
                 "(pip install './trainer[tensorboard]'); train_log.jsonl and the metrics have the same values")
        return None
    run = TensorBoardRun(folder, purge_from_step)
    log.info("TensorBoard event files: %s (tensorboard --logdir %s)", run.folder, run.folder)
    return run
