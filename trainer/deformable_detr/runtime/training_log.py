"""What training reports on disk: `train_log.jsonl` (one JSON object per step, validation and
event) and `status.json` (the run's state, rewritten atomically; the operator reads it)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

from .files import disk_full_error, is_disk_full, write_text_atomic

LOG_NAME = "train_log.jsonl"
STATUS_NAME = "status.json"
STATES = ("running", "completed", "stopped", "failed")


@dataclasses.dataclass
class TrainStatus:
    """`epoch` and `epochs_completed` count finished epochs (progress is epoch / num_epochs: 4 when
    4 of 4 are done); `epoch_index` is the 0-based epoch in progress or last finished, the number
    in checkpoint names and train_log.jsonl; `step` counts optimizer steps."""

    num_epochs: int
    epoch: int = 0
    epochs_completed: int = 0
    epoch_index: int = 0
    step: int = 0
    last_loss: Optional[float] = None
    last_map: Optional[float] = None
    last_checkpoint: Optional[str] = None
    state: str = "running"


def _jsonable(value: Any) -> Any:
    """Plain JSON: tensors and NumPy scalars become floats, NaN/inf become null."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


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
        """A restarted run keeps what the previous one reported (last loss, mAP, checkpoint) until it has news."""
        try:
            with open(self.status_path, encoding="utf-8") as fh:
                previous = json.load(fh)
        except (OSError, ValueError):
            return
        for name in ("epoch", "epochs_completed", "epoch_index", "step", "last_loss", "last_map", "last_checkpoint"):
            if name in previous:
                setattr(self.status, name, previous[name])

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, LOG_NAME)

    @property
    def status_path(self) -> str:
        return os.path.join(self.folder, STATUS_NAME)

    def append(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "time": round(time.time(), 3), **_jsonable(fields)}
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
        self.status.step, self.status.last_loss = step, _jsonable(loss)
        if time.monotonic() - self._status_written >= self.status_every_s:  # keep status.json fresh, cheaply
            self.write_status()

    def log_validation(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.append("validation", epoch=epoch, step=step, **metrics)
        if "mAP" in metrics:
            self.status.last_map = _jsonable(metrics["mAP"])
        self.write_status()

    def update_status(self, **fields: Any) -> None:
        for name, value in fields.items():
            if not hasattr(self.status, name):
                raise AttributeError(f"status.json has no field {name!r}")
            setattr(self.status, name, value)
        if self.status.state not in STATES:
            raise ValueError(f"status state {self.status.state!r}; accepted: {', '.join(STATES)}")
        self.write_status()

    def write_status(self) -> None:
        self._status_written = time.monotonic()
        self.status.epochs_completed = self.status.epoch  # the same count, under a name that says so
        write_text_atomic(self.status_path, json.dumps(_jsonable(dataclasses.asdict(self.status)), indent=2) + "\n")

    def close(self) -> None:
        try:
            self._log.close()
        except OSError:  # a record the full disk refused: already reported when it was written
            pass


def read_status(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, STATUS_NAME), encoding="utf-8") as fh:
        return json.load(fh)


def read_log(folder: str) -> list[dict[str, Any]]:
    with open(os.path.join(folder, LOG_NAME), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
