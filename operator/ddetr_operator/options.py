"""The operator's configuration (command line / environment), read by the controller and its passes."""
from __future__ import annotations

import dataclasses

from .credentials import SECRET_TTL
from .leader import DEFAULT_LEASE_NAME, Timing
from .validate import Policy

DEFAULT_RECONCILE_INTERVAL = 10.0
DEFAULT_FULL_PASS_EVERY = 300.0


@dataclasses.dataclass(frozen=True)
class Options:
    """The operator's configuration (command line / environment)."""

    interval: float = DEFAULT_RECONCILE_INTERVAL
    policy: Policy = Policy()
    read_secrets: bool = True  # read a job's credentials Secret to fetch its progress from S3
    # Seconds between full passes of a job (fresh GET and LISTs) when nothing happens; 0: every pass.
    full_pass_every: float = DEFAULT_FULL_PASS_EVERY
    secret_ttl: float = SECRET_TTL  # seconds the S3 keys read from a job's Secret are reused
    # Leader election: the namespace of the coordination.k8s.io Lease (None: off, this replica acts
    # alone), and this replica's identity in it.
    leader_namespace: str | None = None
    leader_identity: str = ""
    lease_name: str = DEFAULT_LEASE_NAME
    lease_timing: Timing = Timing()
