"""Run the operator: `ddetr-operator [--namespace NS ...] [--liveness URL] [--metrics-port N]`.

Every option has an environment variable, so a Helm chart can set them either way:
DDETR_WATCH_NAMESPACES (comma-separated; empty = all namespaces), DDETR_LIVENESS_ENDPOINT,
DDETR_OPERATOR_METRICS_PORT, DDETR_RECONCILE_INTERVAL, DDETR_ALLOWED_HOST_PATHS
(comma-separated prefixes; empty = no hostPath volumes), DDETR_READ_SECRETS (true/false),
DDETR_LEADER_ELECTION_NAMESPACE (where the leader Lease lives; empty = no leader election: run
one replica), DDETR_LEADER_ELECTION_ID (this replica's identity; default hostname-pid),
DDETR_FULL_PASS_SECONDS (the longest a job goes without a full pass; 0 = every pass is one),
DDETR_SECRET_CACHE_SECONDS (how long S3 keys read from a job's Secret are reused).
"""
from __future__ import annotations

import argparse
import logging
import os
from importlib.metadata import version

import kopf

from . import handlers
from .credentials import SECRET_TTL
from .options import DEFAULT_FULL_PASS_EVERY, Options
from .validate import Policy


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ddetr-operator", description="DeformableDetrJob operator")
    parser.add_argument("--version", action="version", version=f"ddetr-operator {version('ddetr-operator')}")
    env_namespaces = _split(os.environ.get("DDETR_WATCH_NAMESPACES", ""))
    parser.add_argument("--namespace", "-n", action="append", dest="namespaces",
                        help="namespace to watch (repeatable); default: all namespaces")
    parser.add_argument("--liveness", default=os.environ.get("DDETR_LIVENESS_ENDPOINT", "http://0.0.0.0:8080/healthz"),
                        help="kopf liveness endpoint for the pod's probes")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("DDETR_OPERATOR_METRICS_PORT", "8000")),
                        help="port of the operator's Prometheus /metrics (0 = off)")
    parser.add_argument("--reconcile-interval", type=float,
                        default=float(os.environ.get("DDETR_RECONCILE_INTERVAL", "10")),
                        help="seconds between resync passes of each unfinished job (events trigger passes at once)")
    parser.add_argument("--full-pass-every", type=float, metavar="SECONDS",
                        default=float(os.environ.get("DDETR_FULL_PASS_SECONDS", DEFAULT_FULL_PASS_EVERY)),
                        help="the longest a running job goes without a full pass (a fresh GET and LISTs); the "
                             "passes between decide from the watched children and cost no request unless they "
                             "act; 0: every pass is a full one")
    parser.add_argument("--secret-cache-seconds", type=float, metavar="SECONDS",
                        default=float(os.environ.get("DDETR_SECRET_CACHE_SECONDS", SECRET_TTL)),
                        help="reuse the S3 keys read from a job's Secret this long (a rotated Secret is seen "
                             "that much later)")
    parser.add_argument("--allowed-host-path", action="append", dest="allowed_host_paths", metavar="PREFIX",
                        help="accept hostPath volumes under this path (repeatable); default: none")
    parser.add_argument("--read-secrets", action=argparse.BooleanOptionalAction,
                        default=_flag(os.environ.get("DDETR_READ_SECRETS", "true")),
                        help="read the credentials Secret a job names, to fetch its progress from S3 "
                             "(needs `get` on Secrets); off: the operator's own S3 credentials, if any")
    parser.add_argument("--leader-election-namespace",
                        default=os.environ.get("DDETR_LEADER_ELECTION_NAMESPACE", ""),
                        help="hold a coordination.k8s.io Lease in this namespace and act only while holding it "
                             "(several replicas); empty: no leader election")
    parser.add_argument("--leader-election-id", default=os.environ.get("DDETR_LEADER_ELECTION_ID", ""),
                        help="this replica's identity in the Lease (default: hostname-pid)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    args.namespaces = [n.strip() for n in (args.namespaces or env_namespaces)]
    env_paths = _split(os.environ.get("DDETR_ALLOWED_HOST_PATHS", ""))
    args.allowed_host_paths = [p.strip() for p in (args.allowed_host_paths or env_paths) if p.strip()]
    for option in ("full_pass_every", "secret_cache_seconds"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')}: {getattr(args, option)} is not accepted; 0 or more seconds")
    for path in args.allowed_host_paths:
        if not path.startswith("/"):
            parser.error(f"--allowed-host-path: {path!r} is not an absolute path")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = Options(interval=args.reconcile_interval, read_secrets=args.read_secrets,
                               policy=Policy(allowed_host_paths=tuple(args.allowed_host_paths)),
                               leader_namespace=args.leader_election_namespace or None,
                               leader_identity=args.leader_election_id, full_pass_every=args.full_pass_every,
                               secret_ttl=args.secret_cache_seconds)
    registry = handlers.register(kopf.OperatorRegistry(), options=options)
    # standalone: no kopf peering (no KopfPeering CRD); several replicas coordinate through our own
    # Lease instead (leader.py), which keeps every replica watching, ready to take over.
    kopf.run(registry=registry, standalone=True, clusterwide=not args.namespaces, namespaces=args.namespaces,
             liveness_endpoint=args.liveness or None, memo=kopf.Memo(metrics_port=args.metrics_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
