"""status.progress from rank 0's status.json (fields and types from api.Progress)."""
from __future__ import annotations

from typing import Any, Mapping

from ..api import PROGRESS_FIELDS
from .model import State, timestamp


def progress_status(progress: Mapping[str, Any], previous: Mapping[str, Any] | None, now) -> dict:
    """status.progress from status.json; updateTime moves only when the progress does."""
    out: dict[str, Any] = {}
    for key, (name, types) in PROGRESS_FIELDS.items():
        value = progress.get(key)
        if isinstance(value, types) and not isinstance(value, bool):
            out[name] = value
    previous = dict(previous or {})
    since = previous.pop("updateTime", None)
    out["updateTime"] = since if previous == out and since else timestamp(now)
    return out


def record_progress(s: State) -> None:
    if not s.observed.progress:
        return
    s.status["progress"] = progress_status(s.observed.progress, s.status.get("progress"), s.now)
    epoch, total = s.status["progress"].get("epoch"), s.status["progress"].get("numEpochs")
    if epoch is not None and total is not None:
        s.status["epochs"] = f"{epoch}/{total}"
