"""What a pass sees (Observed), what it decides (actions, events, Decision) and the state it builds."""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Mapping

from .. import api
from ..render import KUEUE_QUEUE_LABEL
from ..validate import Policy

TERMINAL = ("Succeeded", "Failed")
MAX_MESSAGE = 1500
# The status fields a pass owns (the rest of status is kopf's).
OWN_STATUS = api.STATUS_FIELDS


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """Rank 0's heartbeat as this operator saw it: the status.progress it last read from status.json
    (updateTime left out) and since when it stood so. Kept in the operator's memory, not in the
    status: status.json moves every 30 s, and patching each move would cost a request (decide/hangs.py)."""

    progress: Mapping[str, Any]
    since: dt.datetime


@dataclasses.dataclass
class Observed:
    """What the handler saw of a job's children."""

    service: bool = False
    configmap: bool = False
    podgroup: bool = False
    network_policy: bool = False
    worker_jobs: list[dict] = dataclasses.field(default_factory=list)  # every attempt's Job still present
    pods: list[dict] = dataclasses.field(default_factory=list)  # every attempt's pods still present
    progress: Mapping[str, Any] | None = None  # rank 0's status.json, when readable
    heartbeat: Heartbeat | None = None  # as the previous pass left it (None: first pass of this operator)
    # Warning events on the current worker Job (FailedCreate: Pod Security, quota), read only while
    # it has fewer pods than the gang.
    worker_events: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Create:
    manifest: dict


@dataclasses.dataclass(frozen=True)
class DeleteWorkerJob:
    name: str


@dataclasses.dataclass(frozen=True)
class SetSuspend:
    name: str
    suspend: bool


@dataclasses.dataclass(frozen=True)
class DeleteSelf:
    """ttlSecondsAfterFinished ran out: delete the DeformableDetrJob (children go with it)."""


Action = Create | DeleteWorkerJob | SetSuspend | DeleteSelf


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclasses.dataclass
class Decision:
    status: dict
    actions: list[Action] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)
    heartbeat: Heartbeat | None = None  # for the next pass (Observed.heartbeat)


def as_mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclasses.dataclass
class State:
    """One pass's working state: the functions of decide/ read it and add to status, actions, events."""

    body: Mapping[str, Any]  # the job as the API server (or the watch) gave it
    observed: Observed
    now: dt.datetime
    policy: Policy
    status: dict
    run_policy: api.RunPolicy
    job: api.Job | None = None  # the resolved job, once its spec is accepted
    actions: list[Action] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)
    heartbeat: Heartbeat | None = None
    unshown: dict = dataclasses.field(default_factory=dict)  # newer status.json fields not worth a patch alone

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def queued(self) -> bool:
        """Kueue owns the worker Job's suspend switch."""
        return bool((self.body["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL))

    @property
    def attempt(self) -> int:
        return int(self.status["attempt"])

    def decision(self) -> Decision:
        return Decision(self.status, self.actions, self.events, self.heartbeat)
