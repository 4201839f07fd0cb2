"""status.progress, bestCheckpoint, goodput and epochs from rank 0's status.json (read by status_file's
parser; the fields shown: api.py), and when they are worth a status patch.

With results on S3, status.json moves every 30 s; patching each move would triple the operator's API
requests per running job (bench/accounting_cost.py). So a pass patches them only when a person or a
decision needs the change: the epoch, a validation, a checkpoint, the trainer's state, the best
checkpoint, the finish estimate moving by more than max(5 min, 10% of the time left). Step, loss,
percent, images/s and goodput ride along with those patches and with any patch the pass makes anyway.
The hang heartbeat does not need the status: the operator keeps it in memory (hangs.py).
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

from deformable_detr.runtime.status_file import parse_status

from ..api import PROGRESS_FIELDS
from .goodput import goodput_status
from .hangs import next_heartbeat
from .model import State, parse_time, timestamp

# Status fields from status.json rather than from the job or its children: a pass may patch them alone.
FROM_STATUS_JSON = frozenset({"progress", "epochs", "bestCheckpoint", "goodput"})
FINISH = PROGRESS_FIELDS["estimated_finish_time"][0]
# status.progress fields that move with every step or two: never worth a patch of their own.
MOVING = frozenset(PROGRESS_FIELDS[name][0] for name in (
    "step", "last_loss", "percent", "images_per_second", "skipped_samples", "estimated_finish_time")) | {"updateTime"}
FINISH_DRIFT_S = 300.0  # the finish estimate is patched once it moved more than this
FINISH_DRIFT_SHARE = 0.1  # ... and more than this share of the time left


def progress_status(progress: Mapping[str, Any], previous: Mapping[str, Any] | None, now: dt.datetime) -> dict:
    """status.progress from status.json; updateTime moves only when the progress does."""
    # Values of another type are dropped: one odd field must never make the API server reject the patch.
    known = parse_status(progress) or {}
    out: dict[str, Any] = {name: known[key] for key, (name, _) in PROGRESS_FIELDS.items() if key in known}
    previous = dict(previous or {})
    since = previous.pop("updateTime", None)
    out["updateTime"] = since if previous == out and since else timestamp(now)
    return out


def finish_drifted(shown: str | None, fresh: str | None, now: dt.datetime) -> bool:
    """Whether the finish estimate moved enough for a patch: an estimate appearing or going, or one
    moved by more than FINISH_DRIFT_S and more than FINISH_DRIFT_SHARE of the time the shown one leaves. Being
    an absolute time, the one shown stays right between patches while the step rate holds."""
    if shown == fresh:
        return False
    if shown is None or fresh is None:
        return True
    try:
        old, new = parse_time(shown), parse_time(fresh)
    except ValueError:
        return False  # an estimate that cannot be read is worth no patch of its own
    left = max((old - now).total_seconds(), 0.0)  # as shown: what a person reads now
    return abs((new - old).total_seconds()) > max(FINISH_DRIFT_S, FINISH_DRIFT_SHARE * left)


def worth_patching(shown: Mapping[str, Any] | None, fresh: Mapping[str, Any], now: dt.datetime) -> bool:
    """Whether status.progress `fresh` (newer than `shown`, the one in the status) is worth a patch of its own."""
    if not shown:
        return True

    def steady(progress: Mapping[str, Any]) -> dict:
        return {key: value for key, value in progress.items() if key not in MOVING}
    return steady(shown) != steady(fresh) or finish_drifted(shown.get(FINISH), fresh.get(FINISH), now)


def best_checkpoint(progress: Mapping[str, Any]) -> dict | None:
    """status.bestCheckpoint: the checkpoint with the best validation mAP that status.json names."""
    known = parse_status(progress) or {}
    if "best_checkpoint" not in known:
        return None
    return {"uri": known["best_checkpoint"], "epoch": known.get("best_epoch"), "map": known.get("best_map")}


def record_progress(s: State) -> None:
    """The heartbeat for the hang decision, and the status fields from status.json when worth a patch
    (else kept in s.unshown for a patch made anyway: show_with_any_patch)."""
    shown = s.status.get("progress")
    fresh = progress_status(s.observed.progress, shown, s.now) if s.observed.progress else None
    s.heartbeat = next_heartbeat(s.observed.heartbeat, fresh, shown, s.now)
    if fresh is None:
        return
    fields: dict[str, Any] = {"progress": fresh}
    # Refreshed with the progress only: a clock alone moving must not patch the status every pass.
    if fresh != shown or "goodput" not in s.status:
        goodput = goodput_status(s.observed.progress, parse_time(s.body["metadata"].get("creationTimestamp")),
                                 s.now, int(s.status.get("hangs") or 0), s.run_policy.progress_deadline_seconds)
        if goodput is not None:
            fields["goodput"] = goodput
    best = best_checkpoint(s.observed.progress)
    if best is not None:
        fields["bestCheckpoint"] = best
    epoch, total = fresh.get("epoch"), fresh.get("numEpochs")
    if epoch is not None and total is not None:
        fields["epochs"] = f"{epoch}/{total}"
    first = any(key not in s.status for key in fields)
    better = "bestCheckpoint" in fields and fields["bestCheckpoint"] != s.status.get("bestCheckpoint")
    if first or better or worth_patching(shown, fresh, s.now):
        s.status.update(fields)
    else:
        s.unshown = fields


def show_with_any_patch(s: State, old_status: Mapping[str, Any]) -> None:
    """A pass that patches the status for another reason shows the newest progress in the same request."""
    if s.unshown and any(old_status.get(key) != value for key, value in s.status.items()
                         if key not in FROM_STATUS_JSON):
        s.status.update(s.unshown)
        s.unshown = {}
