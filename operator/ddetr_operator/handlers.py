"""kopf registration: the watch events, start-up, clean-up, log-in and the liveness probe, each handed to
the controller. Only kopf.on.event: no timers, daemons or on.delete, so kopf adds no finalizer (why:
docs/architecture.md, "Operator")."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
from typing import Any

import kopf

from . import GROUP, LABEL_JOB, PLURAL, VERSION, metrics
from .controller import Controller
from .kube import Cluster, load_api_client
from .leader import LeaseElector
from .options import Options

# The finalizer kopf added while the operator used a timer. Kept as kopf's persistence finalizer so
# that kopf strips it from old jobs (it removes that one finalizer where no handler requires it).
LEGACY_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


def _controller(memo: kopf.Memo) -> Controller:
    return memo.controller


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, options: Options) -> None:
    # Our resources are known in advance; no need to watch (and have RBAC for) all CRDs.
    settings.scanning.disabled = True
    settings.posting.reporting_component = "ddetr-operator"
    settings.watching.server_timeout = 300
    # No handler requires a finalizer, so kopf adds none; with this (its default) name it strips
    # the one an earlier version of this operator left on old jobs.
    settings.persistence.finalizer = LEGACY_FINALIZER
    memo.controller = Controller(Cluster(load_api_client(), secret_ttl=options.secret_ttl), options)
    port = getattr(memo, "metrics_port", None)
    if port is None:
        port = int(os.environ.get("DDETR_OPERATOR_METRICS_PORT", "8000"))
    if port:
        metrics.start_metrics_server(port)


async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    for attribute in ("resync_task", "elect_task"):
        task = getattr(memo, attribute, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    controller = getattr(memo, "controller", None)
    if controller is not None:
        await controller.drain()


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account in a cluster, else the kubeconfig (KUBECONFIG)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def jobs_known(**_: Any) -> int:
    """Liveness detail: how many jobs the operator tracks (the probe answers while kopf's loop lives)."""
    return metrics.phases.count()


async def on_job_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    controller = _controller(memo)
    raw = dict(event.get("object") or {}) or dict(body)
    key = (raw["metadata"]["namespace"], raw["metadata"]["name"])
    if event.get("type") == "DELETED":
        # Children go with the job through their ownerReferences; the operator only forgets it.
        controller.forget(key)
        metrics.phases.forget(raw["metadata"].get("uid"))
        metrics.forget_goodput(raw["metadata"])
        return
    if not controller.is_news(raw):
        return  # the operator's own status patch coming back, or older than what a pass saw
    controller.remember(raw)
    controller.trigger(key)


def child_event_handler(plural: str):
    async def on_child_event(event: kopf.RawEvent, labels: kopf.Labels, namespace: str, memo: kopf.Memo,
                             **_: Any) -> None:
        owner = labels.get(LABEL_JOB)
        _controller(memo).child_event(plural, event.get("type"), event.get("object") or {},
                                      (namespace, owner) if owner and namespace else None)
    return on_child_event


def register(registry: kopf.OperatorRegistry, interval: float | None = None,
             options: Options | None = None) -> kopf.OperatorRegistry:
    """Register the handlers: on.event only (no timers, daemons or on.delete: no finalizers)."""
    options = options or Options()
    if interval is not None:
        options = dataclasses.replace(options, interval=interval)

    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure(settings, memo, options)
        controller = _controller(memo)
        loop = asyncio.get_running_loop()
        memo.resync_task = loop.create_task(controller.resync_forever())
        if options.leader_namespace:
            elector = LeaseElector(controller.cluster.api_client, options.leader_namespace,
                                   options.leader_identity or f"{socket.gethostname()}-{os.getpid()}",
                                   options.lease_name, options.lease_timing)
            memo.elect_task = loop.create_task(controller.elect_forever(elector))

    kopf.on.startup(registry=registry, id="configure")(startup)
    kopf.on.cleanup(registry=registry)(stop_resync)
    kopf.on.login(registry=registry)(login)
    kopf.on.probe(id="jobs_known", registry=registry)(jobs_known)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(on_job_event)
    for group_version, plural in (("batch/v1", "jobs"), ("v1", "pods")):
        kopf.on.event(group_version, plural, labels={LABEL_JOB: kopf.PRESENT}, registry=registry,
                      id=f"owner_of_{plural}")(child_event_handler(plural))
    return registry
