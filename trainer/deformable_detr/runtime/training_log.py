"""What training reports on disk: `train_log.jsonl` (one JSON object per step, validation and
event) and keeping `status.json` (its format: status_file.py) current."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from .files import disk_full_error, is_disk_full
from .status_file import STATUS_NAME, TrainStatus, jsonable, read_status, write_status

LOG_NAME = "train_log.jsonl"


class TrainingLog:
    """Appends records to `train_log.jsonl` and keeps `status.json` current, in `folder`."""

    def __init__(self, folder: str, num_epochs: int, status_every_s: float = 10.0) -> None:
        self.folder = folder
        self.status = TrainStatus(num_epochs=num_epochs)
        self._carry_over_status()
        self.status_every_s = status_every_s
        self._status_written = 0.0
        os.makedirs(folder, exist_ok=True)
        # Line-buffered append: each record reaches the file whole, and a restarted run continues the log.
        self._log = open(os.path.join(folder, LOG_NAME), "a", encoding="utf-8", buffering=1)

    def _carry_over_status(self) -> None:
        """A restarted run keeps what the previous one reported (last loss, mAP, checkpoint) until it has news,
        and counts itself as the next attempt."""
        previous = read_status(self.folder) or {}
        for name in ("epoch", "epochs_completed", "epoch_index", "step", "last_loss", "last_map", "last_checkpoint",
                     "percent", "best_map", "best_epoch", "best_checkpoint", "train_seconds", "eval_seconds",
                     "checkpoint_seconds", "startup_seconds", "recomputed_seconds", "recomputed_steps",
                     "unsaved_seconds"):
            if name in previous:
                setattr(self.status, name, previous[name])
        if previous:
            self.status.attempt = int(previous.get("attempt", 1)) + 1

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, LOG_NAME)

    @property
    def status_path(self) -> str:
        return os.path.join(self.folder, STATUS_NAME)

    def append(self, kind: str, **fields: Any) -> None:
        # `attempt`: which launch wrote it; a resumed run repeats the steps after its checkpoint.
        record = {"kind": kind, "time": round(time.time(), 3), "attempt": self.status.attempt, **jsonable(fields)}
        line = json.dumps(record) + "\n"
        try:
            self._log.write(line)
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(self.log_path, len(line)) from None
            raise

    def log_step(self, *, epoch: int, step: int, losses: dict[str, float], lr: float, **extra: Any) -> None:
        loss = float(sum(losses.values()))
        self.append("step", epoch=epoch, step=step, loss=loss, **losses, lr=lr, **extra)
        self.status.step, self.status.last_loss = step, jsonable(loss)
        if time.monotonic() - self._status_written >= self.status_every_s:  # keep status.json fresh, cheaply
            self.write_status()

    def log_validation(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.append("validation", epoch=epoch, step=step, **metrics)
        if "mAP" in metrics:
            self.status.last_map = jsonable(metrics["mAP"])
        self.write_status()

    def update_status(self, **fields: Any) -> None:
        for name, value in fields.items():
            if not hasattr(self.status, name):
                raise AttributeError(f"status.json has no field {name!r}")
            setattr(self.status, name, value)
        self.write_status()  # refuses a state outside status_file.STATES

    def write_status(self) -> None:
        self._status_written = time.monotonic()
        self.status.epochs_completed = self.status.epoch  # the same count, under a name that says so
        write_status(self.folder, self.status)

    def close(self) -> None:
        try:
            self._log.close()
        except OSError:  # a record the full disk refused: already reported when it was written
            pass

