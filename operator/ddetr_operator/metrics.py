"""The operator's own Prometheus metrics (served by `start_metrics_server`)."""
from __future__ import annotations

import threading
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .api import PHASES

registry = CollectorRegistry()
JOBS = Gauge("ddetr_operator_jobs", "DeformableDetrJobs by phase", ["phase"], registry=registry)
RECONCILE_SECONDS = Histogram("ddetr_operator_reconcile_duration_seconds", "time of one reconcile pass",
                              registry=registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RECONCILE_ERRORS = Counter("ddetr_operator_reconcile_errors_total", "reconcile passes that raised",
                           registry=registry)
RESTARTS = Counter("ddetr_operator_job_restarts_total", "gang restarts after retryable failures",
                   ["namespace"], registry=registry)
FAILURES = Counter("ddetr_operator_job_failures_total", "failed attempts by the trainer's failure class (or the "
                   "failure's reason), the failure rule that decided and its action",
                   ["namespace", "failure_class", "rule", "action"], registry=registry)
RESIZES = Counter("ddetr_operator_job_resizes_total", "attempts started at another world size than the attempt "
                  "before (spec.nodes or spec.gpusPerNode changed while suspended)",
                  ["namespace", "from_world_size", "to_world_size"], registry=registry)
GOODPUT = Gauge("ddetr_operator_job_goodput_ratio", "a job's training time that counted over its time since it was "
                "created (status.goodput.ratio)", ["namespace", "name"], registry=registry)
JOB_SECONDS = Gauge("ddetr_operator_job_time_seconds", "where a job's time went since it was created (status.goodput): "
                    "training, recomputed, eval, checkpoint, startup, hang, waiting", ["namespace", "name", "part"],
                    registry=registry)
TRANSITIONS = Counter("ddetr_operator_phase_transitions_total", "job phase transitions", ["phase"],
                      registry=registry)


class PhaseBook:
    """The phase of every job this operator has seen; feeds the jobs-by-phase gauge."""

    def __init__(self) -> None:
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            JOBS.labels(phase=phase).set(0)

    def record(self, uid: str, phase: str | None) -> None:
        with self._lock:
            if phase:
                self._phases[uid] = phase
            self._publish()

    def forget(self, uid: str) -> None:
        with self._lock:
            self._phases.pop(uid, None)
            self._publish()

    def count(self) -> int:
        with self._lock:
            return len(self._phases)

    def _publish(self) -> None:
        for phase in PHASES:
            JOBS.labels(phase=phase).set(sum(1 for p in self._phases.values() if p == phase))


def count_failure(namespace: str, before: Any, after: Any) -> None:
    """One count per failed attempt: when a pass records a new status.lastFailure."""
    if not isinstance(after, Mapping) or after == before:
        return
    FAILURES.labels(namespace=namespace, failure_class=after.get("failureClass") or after.get("reason") or "Unknown",
                    rule=after.get("rule") or "", action=after.get("action") or "").inc()


def count_resize(namespace: str, before: Any, after: Any) -> None:
    """One count per resized attempt: when a pass records a new status.lastResize."""
    if not isinstance(after, Mapping) or after == before:
        return
    RESIZES.labels(namespace=namespace, from_world_size=str(after.get("fromWorldSize")),
                   to_world_size=str(after.get("toWorldSize"))).inc()


def record_goodput(meta: Mapping[str, Any], goodput: Any) -> None:
    """The job's status.goodput as gauges (the job name as `name`: Prometheus keeps `job` for the scrape job)."""
    from .decide.goodput import PARTS

    if not isinstance(goodput, Mapping) or goodput.get("ratio") is None:
        return
    namespace, name = meta.get("namespace") or "", meta.get("name") or ""
    GOODPUT.labels(namespace=namespace, name=name).set(goodput["ratio"])
    for field, part in PARTS.items():
        if goodput.get(field) is not None:
            JOB_SECONDS.labels(namespace=namespace, name=name, part=part).set(goodput[field])


def forget_goodput(meta: Mapping[str, Any]) -> None:
    """A deleted job's series go with it."""
    from .decide.goodput import PARTS

    namespace, name = meta.get("namespace") or "", meta.get("name") or ""
    for gauge, labels in [(GOODPUT, (namespace, name))] + [(JOB_SECONDS, (namespace, name, p)) for p in PARTS.values()]:
        try:
            gauge.remove(*labels)
        except KeyError:
            pass


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr, registry=registry)
phases = PhaseBook()
