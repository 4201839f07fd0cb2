"""The status.json format: the record training rewrites in its results folder and the operator reads.

Its one home: the name, the fields with their JSON types, the writer and the parser. No torch here
(the operator imports it and its image has none).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import Any, Mapping, Optional, Union

from .files import write_text_atomic

STATUS_NAME = "status.json"
STATES = ("running", "completed", "stopped", "failed")


def _field(description: str, **kwargs: Any) -> Any:
    return dataclasses.field(metadata={"description": description}, **kwargs)


@dataclasses.dataclass
class TrainStatus:
    """`epoch` and `epochs_completed` count finished epochs (progress is epoch / num_epochs: 4 when
    4 of 4 are done); `epoch_index` is the 0-based epoch in progress or last finished, the number
    in checkpoint names and train_log.jsonl; `step` counts optimizer steps."""

    num_epochs: int = _field("total epochs")
    epoch: int = _field("finished epochs", default=0)
    epochs_completed: int = _field("finished epochs (the same count as epoch)", default=0)
    epoch_index: int = _field("0-based epoch in progress or last finished", default=0)
    step: int = _field("optimizer steps so far (global step)", default=0)
    last_loss: Optional[float] = _field("loss of the last step", default=None)
    last_map: Optional[float] = _field("mAP of the last validation", default=None)
    last_checkpoint: Optional[str] = _field("URI of the newest checkpoint", default=None)
    state: str = _field("trainer state: " + ", ".join(STATES), default="running")
    attempt: int = _field("launches of this run: 1 when it started fresh, one more at each resume; every "
                          "train_log.jsonl record names the attempt that wrote it", default=1)
    skipped_samples: int = _field("training images skipped since this launch started (unreadable, or a "
                                  "size unlike the annotation file's)", default=0)
    percent: Optional[float] = _field("percent of the run's training steps done (0..100)", default=None)
    images_per_second: Optional[float] = _field("training images per second over the recent steps (all ranks)",
                                                default=None)
    eta_seconds: Optional[float] = _field("estimated seconds until training ends, from the recent step rate "
                                          "(warm-up steps left out) and the pauses at epoch ends", default=None)
    estimated_finish_time: Optional[str] = _field("estimated UTC time training ends (RFC 3339)", default=None)
    best_map: Optional[float] = _field("best validation mAP of a saved checkpoint so far", default=None)
    best_epoch: Optional[int] = _field("0-based epoch of that checkpoint", default=None)
    best_checkpoint: Optional[str] = _field("URI of the checkpoint with the best validation mAP", default=None)
    stop_reason: Optional[str] = _field("why training ended before its last epoch, when a quality gate ended it",
                                        default=None)
    # Where the run's time went, in seconds, over all launches (the operator's goodput, decide/goodput.py).
    train_seconds: float = _field("time in training steps that count (all launches; steps recomputed after a "
                                  "failure are moved to recomputed_seconds)", default=0.0)
    eval_seconds: float = _field("time in validation (all launches)", default=0.0)
    checkpoint_seconds: float = _field("time writing checkpoints (all launches)", default=0.0)
    startup_seconds: float = _field("time from each launch's start to its first step (model, data, resume)",
                                    default=0.0)
    recomputed_seconds: float = _field("step time lost to failures: the steps after the last checkpoint, trained "
                                       "again by the next launch", default=0.0)
    recomputed_steps: int = _field("steps trained again after failures", default=0)
    unsaved_seconds: float = _field("step time since this launch's last checkpoint (lost should it fail now)",
                                    default=0.0)
    not_uploaded: Optional[list] = _field("files staged beside this status.json and not yet uploaded to the "
                                          "results folder (an upload failed for good); the next run uploads them "
                                          "first", default=None)


def _json_types(annotation: Any) -> tuple[type, ...]:
    """The JSON value types a field accepts: a float field also takes an int (JSON writes 2.0 as 2)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if typing.get_origin(annotation) is Union \
        else [annotation]
    types: tuple[type, ...] = ()
    for arg in args:
        types += (int, float) if arg is float else (arg,)
    return types


# status.json field -> (accepted JSON types, description); read by the operator for its status.progress.
STATUS_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    f.name: (_json_types(typing.get_type_hints(TrainStatus)[f.name]), f.metadata["description"])
    for f in dataclasses.fields(TrainStatus)}


def jsonable(value: Any) -> Any:
    """Plain JSON: tensors and NumPy scalars become numbers, NaN/inf become null."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def format_status(status: TrainStatus) -> str:
    if status.state not in STATES:
        raise ValueError(f"status state {status.state!r}; accepted: {', '.join(STATES)}")
    return json.dumps(jsonable(dataclasses.asdict(status)), indent=2) + "\n"


def write_status(folder: str, status: TrainStatus) -> None:
    """Rewrite `folder`/status.json atomically (a reader never sees half of it)."""
    write_text_atomic(os.path.join(folder, STATUS_NAME), format_status(status))


def parse_status(raw: Union[bytes, str, Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """The known fields of a status.json whose values have their JSON type (others are dropped: one odd
    field must not spoil the rest); None when it is not a JSON object (torn, or not a status)."""
    if isinstance(raw, (bytes, str)):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    if not isinstance(raw, Mapping):
        return None
    out = {}
    for name, (types, _) in STATUS_FIELDS.items():
        value = raw.get(name)
        if isinstance(value, types) and not isinstance(value, bool):
            out[name] = value
    return out


def read_status(folder: str) -> Optional[dict[str, Any]]:
    """The parsed status.json in a local `folder`, or None when there is none (or it is not readable)."""
    try:
        with open(os.path.join(folder, STATUS_NAME), "rb") as fh:
            return parse_status(fh.read())
    except OSError:
        return None
