"""Training progress from rank 0: the `status.json` it rewrites in the train results folder.

Why this channel: it is the trainer's documented output (architecture.md), it survives
pod restarts, it needs no network path from the operator into trainer pods, and the
operator already knows where it lives (the effective spec) and which credentials reach
it (the job's Secret). Only `s3://` results folders are readable from the operator;
with a results folder on a PVC the status shows phase and restarts but no progress.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.runtime.paths import task_results_dir
from deformable_detr.runtime.training_log import STATUS_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Access:
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None


_CLIENTS: "OrderedDict[S3Access, Any]" = OrderedDict()
_CLIENTS_LOCK = threading.Lock()
MAX_CLIENTS = 64


def _client(access: S3Access):
    """One S3 client per endpoint and credentials, reused across passes.

    Making a boto3 client loads the service model (tens of ms of CPU each time): per pass, that
    dominated a pass at 100 jobs. Clients are thread-safe to call; making them is not (boto3's
    default session), hence the lock. The least recently used beyond MAX_CLIENTS are dropped.
    """
    import boto3
    from botocore.config import Config
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(access)
        if client is None:
            client = boto3.session.Session().client(
                "s3", endpoint_url=access.endpoint or None, region_name=access.region or "us-east-1",
                aws_access_key_id=access.access_key_id, aws_secret_access_key=access.secret_access_key,
                # A slow store must not stall the reconcile loop.
                config=Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1}))
            _CLIENTS[access] = client
            while len(_CLIENTS) > MAX_CLIENTS:
                _CLIENTS.popitem(last=False)
        else:
            _CLIENTS.move_to_end(access)
        return client


def status_json_uri(experiment: ExperimentConfig) -> str:
    return task_results_dir(experiment, "train").rstrip("/") + "/" + STATUS_NAME


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def read_status_json(uri: str, access: S3Access) -> dict[str, Any] | None:
    """The parsed status.json, or None when it is not there (yet) or not readable from here."""
    if not uri.startswith("s3://"):
        return None
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client(access)
    bucket, key = split_s3_uri(uri)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        data = json.loads(body)
    except (BotoCoreError, ClientError, ValueError) as err:
        logger.debug("no progress from %s: %s", uri, err)
        return None
    return data if isinstance(data, dict) else None
