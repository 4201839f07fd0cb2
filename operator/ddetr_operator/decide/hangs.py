"""runPolicy.progressDeadlineSeconds: a gang whose pods all run while rank 0's heartbeat (the
status.json the operator reads every pass) stands still is hung: a stuck collective, a dead or
stopped peer, a stalled read. No pod exits in that case, so nothing else would end it.

The heartbeat lives in the operator's memory (Heartbeat, passed from pass to pass), not in the status:
status.progress is patched only when a person or a decision needs it (decide/progress.py).
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping, Sequence

from .conditions import condition
from .failures import Failure, _rank
from .model import Heartbeat, State, parse_time, timestamp

HUNG = "Hung"


def _content(progress: Mapping[str, Any] | None) -> dict:
    return {k: v for k, v in (progress or {}).items() if k != "updateTime"}


def next_heartbeat(previous: Heartbeat | None, fresh: Mapping[str, Any] | None, shown: Mapping[str, Any] | None,
                   now: dt.datetime) -> Heartbeat | None:
    """The heartbeat after this pass read `fresh` (status.progress from status.json; None: unreadable).

    Unreadable counts as standing still. Without a previous one (the operator restarted, or a new
    leader took over), the patched status.progress (`shown`) says since when the same progress stood
    if it is the same; if status.json moved since that patch, it moved at an unknown time before now,
    so the clock starts now: a restart may delay a hang's verdict by one deadline, never invent one.
    """
    if fresh is None:
        return previous
    now = now.replace(microsecond=0)  # as status times are kept: a beat at the Running pass arms nothing
    content = _content(fresh)
    if previous is not None:
        return previous if previous.progress == content else Heartbeat(content, now)
    since = parse_time((shown or {}).get("updateTime"))
    if since is not None and _content(shown) == content:
        return Heartbeat(content, min(since, now))
    return Heartbeat(content, now)


def hung(s: State, pods: Sequence[Mapping[str, Any]]) -> Failure | None:
    """The Hung failure of the running attempt, or None while it advances (or is not watched).

    Armed by this attempt's first heartbeat (a change of status.json after the gang was all running):
    start-up (imports, model build, data, a resume) is not judged, and a new attempt never by the old
    one's heartbeat. The age counts from the heartbeat's last change.
    """
    limit = s.run_policy.progress_deadline_seconds
    running = condition(s, "Running", true_only=True)
    beat = s.heartbeat
    if not limit or running is None or beat is None or s.status.get("phase") != "Running":
        return None
    if beat.progress.get("state") not in (None, "running"):
        return None  # the trainer is finishing: its pods exit on their own
    since = parse_time(running.get("lastTransitionTime"))
    if since is None or beat.since <= since or s.now < beat.since + dt.timedelta(seconds=limit):
        return None
    idle = int((s.now - beat.since).total_seconds())
    step = beat.progress.get("step")
    rank0 = next((p for p in pods if _rank(p) == 0), None)
    message = (f"rank 0's heartbeat has not advanced for {idle} s while all pods run "
               f"(runPolicy.progressDeadlineSeconds {limit}): last step {step} seen at {timestamp(beat.since)}")
    return Failure(True, HUNG, message, pod=rank0["metadata"]["name"] if rank0 else None, rank=0,
                   failure_class=HUNG, step=step if isinstance(step, int) else None)


def count_hang(s: State) -> None:
    s.status["hangs"] = int(s.status.get("hangs") or 0) + 1
