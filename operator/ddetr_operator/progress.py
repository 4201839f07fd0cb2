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


def status_json_uri(experiment: ExperimentConfig) -> str:
    return task_results_dir(experiment, "train").rstrip("/") + "/" + STATUS_NAME


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def read_status_json(uri: str, access: S3Access) -> dict[str, Any] | None:
    """The parsed status.json, or None when it is not there (yet) or not readable from here."""
    if not uri.startswith("s3://"):
        return None
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3", endpoint_url=access.endpoint or None, region_name=access.region or "us-east-1",
        aws_access_key_id=access.access_key_id, aws_secret_access_key=access.secret_access_key,
        # A slow store must not stall the reconcile loop.
        config=Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1}))
    bucket, key = split_s3_uri(uri)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        data = json.loads(body)
    except (BotoCoreError, ClientError, ValueError) as err:
        logger.debug("no progress from %s: %s", uri, err)
        return None
    return data if isinstance(data, dict) else None
