"""Run the operator: `ddetr-operator [--namespace NS ...] [--liveness URL] [--metrics-port N]`.

Every option has an environment variable, so a Helm chart can set them either way:
DDETR_WATCH_NAMESPACES (comma-separated; empty = all namespaces), DDETR_LIVENESS_ENDPOINT,
DDETR_OPERATOR_METRICS_PORT, DDETR_RECONCILE_INTERVAL.
"""
from __future__ import annotations

import argparse
import logging
import os

import kopf

from . import handlers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ddetr-operator", description="DeformableDetrJob operator")
    env_namespaces = [n for n in os.environ.get("DDETR_WATCH_NAMESPACES", "").split(",") if n.strip()]
    parser.add_argument("--namespace", "-n", action="append", dest="namespaces",
                        help="namespace to watch (repeatable); default: all namespaces")
    parser.add_argument("--liveness", default=os.environ.get("DDETR_LIVENESS_ENDPOINT", "http://0.0.0.0:8080/healthz"),
                        help="kopf liveness endpoint for the pod's probes")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("DDETR_OPERATOR_METRICS_PORT", "8000")),
                        help="port of the operator's Prometheus /metrics (0 = off)")
    parser.add_argument("--reconcile-interval", type=float,
                        default=float(os.environ.get("DDETR_RECONCILE_INTERVAL", "10")),
                        help="seconds between reconcile passes of each job")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    args.namespaces = [n.strip() for n in (args.namespaces or env_namespaces)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = handlers.register(kopf.OperatorRegistry(), interval=args.reconcile_interval)
    # One replica (Deployment strategy Recreate); standalone: no KopfPeering CRD needed.
    kopf.run(registry=registry, standalone=True, clusterwide=not args.namespaces, namespaces=args.namespaces,
             liveness_endpoint=args.liveness or None, memo=kopf.Memo(metrics_port=args.metrics_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
