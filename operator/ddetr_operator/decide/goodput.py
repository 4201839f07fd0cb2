"""status.goodput: where a job's wall-clock time went since it was created, and its goodput (training
time that counted over the total). The trainer accounts its own time in status.json (steps, validation,
checkpoints, start-ups, steps recomputed after failures); hangs cost at least progressDeadlineSeconds
each; the rest is waiting: queueing and admission, scheduling, image pulls, and each restart's teardown
and pod start before the trainer's own start-up begins."""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

from deformable_detr.runtime.status_file import parse_status

# status.json field -> status.goodput field
TRAINER_PARTS = {"train_seconds": "trainingSeconds", "eval_seconds": "evalSeconds",
                 "checkpoint_seconds": "checkpointSeconds", "startup_seconds": "startupSeconds",
                 "recomputed_seconds": "recomputedSeconds"}
# Every part of totalSeconds, as the operator's metric labels them.
PARTS = {**{field: field.removesuffix("Seconds") for field in TRAINER_PARTS.values()},
         "hangSeconds": "hang", "waitingSeconds": "waiting"}


def goodput_status(progress: Mapping[str, Any], created: dt.datetime | None, now: dt.datetime, hangs: int,
                   progress_deadline_seconds: int | None) -> dict | None:
    """status.goodput from rank 0's status.json, or None before there is anything to account."""
    known = parse_status(progress) or {}
    if created is None or not any(name in known for name in TRAINER_PARTS):
        return None
    total = max((now - created).total_seconds(), 0.0)
    out: dict[str, Any] = {field: round(float(known.get(name, 0.0)), 1) for name, field in TRAINER_PARTS.items()}
    out["hangSeconds"] = float(hangs * (progress_deadline_seconds or 0))
    accounted = sum(out.values())
    total = max(total, accounted)  # clocks of two machines: never a negative wait
    out["waitingSeconds"] = round(total - accounted, 1)
    out["totalSeconds"] = round(total, 1)
    out["recomputedSteps"] = int(known.get("recomputed_steps", 0))
    out["ratio"] = round(out["trainingSeconds"] / total, 4) if total > 0 else 0.0
    return out
