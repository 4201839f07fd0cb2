"""runPolicy.progressDeadlineSeconds: a gang whose pods all run while rank 0's heartbeat (the
status.json step the operator reads into status.progress) stands still is hung: a stuck collective,
a dead or stopped peer, a stalled read. No pod exits in that case, so nothing else would end it.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping, Sequence

from .conditions import condition
from .failures import Failure, _rank
from .model import State, parse_time

HUNG = "Hung"


def hung(s: State, pods: Sequence[Mapping[str, Any]]) -> Failure | None:
    """The Hung failure of the running attempt, or None while it advances (or is not watched).

    Armed by this attempt's first heartbeat (status.progress.updateTime after the gang was all
    running): start-up (imports, model build, data, a resume) is not judged, and a new attempt never
    by the old one's heartbeat. The age counts from the heartbeat's last change.
    """
    limit = s.run_policy.progress_deadline_seconds
    running = condition(s, "Running", true_only=True)
    if not limit or running is None or s.status.get("phase") != "Running":
        return None
    progress = s.status.get("progress") or {}
    if progress.get("state") not in (None, "running"):
        return None  # the trainer is finishing: its pods exit on their own
    beat, since = parse_time(progress.get("updateTime")), parse_time(running.get("lastTransitionTime"))
    if beat is None or since is None or beat <= since or s.now < beat + dt.timedelta(seconds=limit):
        return None
    idle = int((s.now - beat).total_seconds())
    step = progress.get("step")
    rank0 = next((p for p in pods if _rank(p) == 0), None)
    message = (f"rank 0's heartbeat has not advanced for {idle} s while all pods run "
               f"(runPolicy.progressDeadlineSeconds {limit}): last step {step} seen at {progress['updateTime']}")
    return Failure(True, HUNG, message, pod=rank0["metadata"]["name"] if rank0 else None, rank=0,
                   failure_class=HUNG, step=step if isinstance(step, int) else None)


def count_hang(s: State) -> None:
    s.status["hangs"] = int(s.status.get("hangs") or 0) + 1
