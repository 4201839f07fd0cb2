"""Leader election's decision: who may write the Lease next."""
from __future__ import annotations

import datetime as dt

from ddetr_operator.leader import Timing, next_holder

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
TIMING = Timing(duration=15, renew_deadline=10, renew_every=2)


def lease(holder: str, renewed: dt.datetime, transitions: int = 0) -> dict:
    stamp = renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"metadata": {"name": "l", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "acquireTime": stamp, "renewTime": stamp,
                     "leaseTransitions": transitions}}


def test_no_lease_yet_is_acquired():
    spec = next_holder(None, "a", NOW, TIMING)
    assert spec["holderIdentity"] == "a" and spec["leaseTransitions"] == 0
    assert spec["renewTime"] == "2026-01-02T03:04:05.000000Z"


def test_a_live_lease_of_another_replica_is_left_alone():
    assert next_holder(lease("b", NOW - dt.timedelta(seconds=14)), "a", NOW, TIMING) is None


def test_the_holder_renews_keeping_its_acquire_time():
    spec = next_holder(lease("a", NOW - dt.timedelta(seconds=3)), "a", NOW, TIMING)
    assert spec["renewTime"] == "2026-01-02T03:04:05.000000Z"
    assert spec["acquireTime"] == "2026-01-02T03:04:02.000000Z" and spec["leaseTransitions"] == 0


def test_an_expired_lease_is_taken_over():
    spec = next_holder(lease("b", NOW - dt.timedelta(seconds=16), transitions=2), "a", NOW, TIMING)
    assert spec["holderIdentity"] == "a" and spec["leaseTransitions"] == 3


def test_the_holder_stops_acting_before_another_may_take_over():
    assert TIMING.renew_deadline < TIMING.duration


def test_a_replica_that_is_not_the_leader_runs_no_pass_but_remembers_jobs():
    from ddetr_operator.controller import Controller
    from ddetr_operator.options import Options
    from operator_objects import idle_cluster
    controller = Controller(cluster=idle_cluster(), options=Options(leader_namespace="ddetr-system"))
    assert controller.leading is False
    key = controller.remember({"metadata": {"namespace": "ml", "name": "demo"}, "status": {"phase": "Running"}})
    controller.trigger(key)  # would need an event loop (and a cluster) if it started a pass
    assert key in controller.jobs and not controller._running
    assert Controller(cluster=idle_cluster()).leading is True  # no leader election: always acts
