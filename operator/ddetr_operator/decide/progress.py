"""status.progress from rank 0's status.json (read by status_file's parser; the fields shown: api.py)."""
from __future__ import annotations

from typing import Any, Mapping

from deformable_detr.runtime.progress import format_duration
from deformable_detr.runtime.status_file import parse_status

from ..api import PROGRESS_FIELDS
from .goodput import goodput_status
from .model import State, parse_time, timestamp


def progress_status(progress: Mapping[str, Any], previous: Mapping[str, Any] | None, now) -> dict:
    """status.progress from status.json; updateTime moves only when the progress does."""
    # Values of another type are dropped: one odd field must never make the API server reject the patch.
    known = parse_status(progress) or {}
    out: dict[str, Any] = {name: known[key] for key, (name, _) in PROGRESS_FIELDS.items() if key in known}
    if "etaSeconds" in out:
        out["eta"] = format_duration(out["etaSeconds"])
    previous = dict(previous or {})
    since = previous.pop("updateTime", None)
    out["updateTime"] = since if previous == out and since else timestamp(now)
    return out


def best_checkpoint(progress: Mapping[str, Any]) -> dict | None:
    """status.bestCheckpoint: the checkpoint with the best validation mAP that status.json names."""
    known = parse_status(progress) or {}
    if "best_checkpoint" not in known:
        return None
    return {"uri": known["best_checkpoint"], "epoch": known.get("best_epoch"), "map": known.get("best_map")}


def record_progress(s: State) -> None:
    if not s.observed.progress:
        return
    previous = s.status.get("progress")
    s.status["progress"] = progress_status(s.observed.progress, previous, s.now)
    # Refreshed with the progress only: a clock alone moving must not patch the status every pass.
    if s.status["progress"] != previous or "goodput" not in s.status:
        goodput = goodput_status(s.observed.progress, parse_time(s.body["metadata"].get("creationTimestamp")),
                                 s.now, int(s.status.get("hangs") or 0), s.run_policy.progress_deadline_seconds)
        if goodput is not None:
            s.status["goodput"] = goodput
    best = best_checkpoint(s.observed.progress)
    if best is not None:
        s.status["bestCheckpoint"] = best
    epoch, total = s.status["progress"].get("epoch"), s.status["progress"].get("numEpochs")
    if epoch is not None and total is not None:
        s.status["epochs"] = f"{epoch}/{total}"
