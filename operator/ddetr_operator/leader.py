"""Leader election with a coordination.k8s.io/v1 Lease, so that of several operator replicas
exactly one acts (creates children, writes status, posts events) at any time.

Every replica watches and remembers jobs; only the holder of the Lease runs passes. The
holder renews every `renew_every` seconds and stops acting when it could not renew for
`renew_deadline` seconds; another replica takes the Lease over only after `duration`
seconds without a renewal (duration > renew_deadline, so the old holder has stopped first,
as client-go's leaderelection). Writes are guarded by the Lease's resourceVersion: of two
replicas racing for it, the API server lets exactly one win (409 Conflict for the other).

The decision of one try is `next_holder` (pure); `LeaseElector.try_once` makes the calls.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from typing import Any, Mapping

import kubernetes
from kubernetes.client.exceptions import ApiException

from .decide.model import parse_time

logger = logging.getLogger(__name__)
RAW = {"_preload_content": False}
DEFAULT_LEASE_NAME = "ddetr-operator-leader"


@dataclasses.dataclass(frozen=True)
class Timing:
    duration: float = 15.0  # a Lease not renewed this long may be taken over
    renew_deadline: float = 10.0  # the holder stops acting when it could not renew this long
    renew_every: float = 2.0


def _micro_time(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def next_holder(lease: Mapping[str, Any] | None, me: str, now: dt.datetime, timing: Timing) -> dict | None:
    """The Lease spec to write for `me` to hold it, or None when another holder's Lease is still live."""
    spec = dict((lease or {}).get("spec") or {})
    holder = spec.get("holderIdentity")
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds") or timing.duration
    live = holder and renewed is not None and now < renewed + dt.timedelta(seconds=duration)
    if holder and holder != me and live:
        return None
    stamp = _micro_time(now)
    if holder == me:
        return {**spec, "renewTime": stamp, "leaseDurationSeconds": int(timing.duration)}
    return {"holderIdentity": me, "leaseDurationSeconds": int(timing.duration), "acquireTime": stamp,
            "renewTime": stamp, "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)}


class LeaseElector:
    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str, identity: str,
                 name: str = DEFAULT_LEASE_NAME, timing: Timing = Timing()):
        self.api = kubernetes.client.CoordinationV1Api(api_client)
        self.namespace, self.identity, self.name, self.timing = namespace, identity, name, timing
        self.renewed_at: float | None = None  # monotonic time of the last successful write

    def try_once(self, monotonic_now: float) -> bool:
        """One acquire-or-renew try (blocking); True when this replica holds the Lease now."""
        now = dt.datetime.now(dt.timezone.utc)
        try:
            try:
                lease = json.loads(self.api.read_namespaced_lease(self.name, self.namespace, **RAW).data)
            except ApiException as err:
                if err.status != 404:
                    raise
                lease = None
            spec = next_holder(lease, self.identity, now, self.timing)
            if spec is None:
                self.renewed_at = None
                return False
            if lease is None:
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
                self.api.create_namespaced_lease(self.namespace, body, **RAW)
            else:
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace,
                                     "resourceVersion": lease["metadata"]["resourceVersion"]}, "spec": spec}
                self.api.replace_namespaced_lease(self.name, self.namespace, body, **RAW)
            self.renewed_at = monotonic_now
            return True
        except ApiException as err:
            if err.status == 409:  # another replica wrote first
                self.renewed_at = None
                return False
            logger.warning("leader election: Lease %s/%s: %s %s", self.namespace, self.name, err.status, err.reason)
            return self.leading(monotonic_now)
        except Exception as err:  # noqa: BLE001 - an unreachable API server: keep the lease only until the deadline
            logger.warning("leader election: %s", err)
            return self.leading(monotonic_now)

    def leading(self, monotonic_now: float) -> bool:
        return self.renewed_at is not None and monotonic_now - self.renewed_at < self.timing.renew_deadline
