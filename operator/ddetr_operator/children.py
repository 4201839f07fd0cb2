"""Each DeformableDetrJob's batch/v1 Jobs and Pods as the watch streams last showed them (the index
cached passes read), and how two states of one object compare (resourceVersion)."""
from __future__ import annotations

import threading
import time
from typing import Any, Mapping

from . import LABEL_JOB


def resource_version(obj: Mapping[str, Any] | None) -> int | None:
    """The object's resourceVersion as a number, or None where it is not one.

    etcd's revisions: Kubernetes documents them as comparable since 1.35 (KEP-5504). Where an
    API server gives something else (KMock gives none), nothing is compared and the newest
    arrival wins.
    """
    value = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def is_older(candidate: Mapping[str, Any], known: Mapping[str, Any] | None, or_same: bool = False) -> bool:
    """Whether `candidate` is an older state of `known` than `known` itself (or the same one, with
    or_same); False whenever the two cannot be compared."""
    new, old = resource_version(candidate), resource_version(known)
    if new is None or old is None:
        return False
    return new < old or (or_same and new == old)


def _slim(obj: Mapping[str, Any]) -> dict:
    """The object without managedFields (half a pod's size, and never read)."""
    meta = obj.get("metadata") or {}
    if "managedFields" not in meta:
        return dict(obj)
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


CHILD_KINDS = ("jobs", "pods")  # the plurals of the watched children: batch/v1 Jobs and Pods
TOMBSTONE_SECONDS = 600.0  # how long a deleted child's uid keeps a LIST answered earlier from bringing it back


class ChildIndex:
    """Each DeformableDetrJob's batch/v1 Jobs and Pods, as the watch streams last showed them.

    Keyed by (namespace, value of the ddetr.dev/job-name label). Fed by the watch events
    (`record`, from the event loop) and by the LISTs of a fresh observation (`merge_list`, from
    a pass's thread); read by passes (`children`). Objects are replaced, never edited, so a
    reader holds a consistent object. A watch event older than what is known (a LIST answered
    later than the event was sent) is dropped; a DELETED event removes the object and leaves a
    tombstone so that a LIST answered before the deletion cannot bring it back. Objects a LIST
    no longer shows are dropped (unless newer than the LIST): that clears what a watch that
    re-listed after a gap never reported deleted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self._gone: dict[str, float] = {}  # uid -> when its DELETED event came
        self._swept = time.monotonic()

    @staticmethod
    def owner_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
        meta = obj.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(LABEL_JOB)
        if not owner or not meta.get("namespace") or not meta.get("name"):
            return None
        return meta["namespace"], owner

    def record(self, kind: str, event_type: str | None, obj: Mapping[str, Any]) -> tuple[str, str] | None:
        """One watch event of a child (kind "jobs" or "pods"); returns its owner's key."""
        owner = self.owner_of(obj)
        if owner is None:
            return None
        meta = obj["metadata"]
        key = (kind, meta["name"])
        with self._lock:
            children = self._owners.setdefault(owner, {})
            current = children.get(key)
            if event_type == "DELETED":
                if current is not None and (current["metadata"].get("uid") in (None, meta.get("uid"))
                                            or not meta.get("uid")):
                    del children[key]
                if meta.get("uid"):
                    self._gone[meta["uid"]] = time.monotonic()
                    self._sweep()
                if not children:
                    del self._owners[owner]
            elif current is None or not is_older(obj, current):
                children[key] = _slim(obj)
        return owner

    def merge_list(self, namespace: str, owner: str, kind: str, items: list[dict], list_version: str | None) -> None:
        """What a LIST of one job's children of one kind answered (at resourceVersion list_version)."""
        listed_at = int(list_version) if isinstance(list_version, str) and list_version.isdigit() else None
        with self._lock:
            children = self._owners.setdefault((namespace, owner), {})
            listed = set()
            for obj in items:
                if obj["metadata"].get("uid") in self._gone:
                    continue  # deleted since the LIST was answered
                key = (kind, obj["metadata"]["name"])
                listed.add(key)
                if key not in children or not is_older(obj, children[key]):
                    children[key] = _slim(obj)
            for key, obj in list(children.items()):
                if key[0] != kind or key in listed:
                    continue
                version = resource_version(obj)
                if listed_at is None or version is None or version <= listed_at:
                    del children[key]  # gone by the time of the LIST (a later event would be newer)
            if not children:
                del self._owners[(namespace, owner)]

    def children(self, namespace: str, owner: str) -> tuple[list[dict], list[dict]]:
        """(batch Jobs, Pods) of one job."""
        with self._lock:
            children = list((self._owners.get((namespace, owner)) or {}).items())
        return ([obj for (kind, _), obj in children if kind == "jobs"],
                [obj for (kind, _), obj in children if kind == "pods"])

    def forget(self, namespace: str, owner: str) -> None:
        with self._lock:
            self._owners.pop((namespace, owner), None)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(children) for children in self._owners.values())

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < 60:
            return
        self._swept = now
        for uid, when in list(self._gone.items()):
            if now - when > TOMBSTONE_SECONDS:
                del self._gone[uid]
