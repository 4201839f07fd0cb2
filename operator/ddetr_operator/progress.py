"""Training progress from rank 0: the `status.json` it rewrites in the train results folder.

Why this channel (the trainer's documented output, surviving pod restarts, no network path into
the pods): docs/architecture.md. Only `s3://` results folders are readable from the operator. The
S3 client and URI splitting are the trainer's (runtime/storage.py), with a short patience here.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.runtime import storage
from deformable_detr.runtime.paths import task_results_dir
from deformable_detr.runtime.status_file import STATUS_NAME
from deformable_detr.tasks import DEFAULT_TASK

logger = logging.getLogger(__name__)
# A slow store must not stall the reconcile loop: short timeouts, no retries (the next pass reads again).
PATIENCE = {"connect_timeout": 3, "read_timeout": 5, "max_attempts": 1}


def s3_access(endpoint: str | None = None, region: str | None = None, access_key_id: str | None = None,
              secret_access_key: str | None = None) -> storage.S3Access:
    """How the operator reaches a job's store (None: boto3's own chain, the operator's credentials)."""
    return storage.S3Access(endpoint=endpoint or None, region=region or "us-east-1", access_key_id=access_key_id,
                            secret_access_key=secret_access_key, **PATIENCE)


def status_json_uri(experiment: ExperimentConfig) -> str:
    return task_results_dir(experiment, DEFAULT_TASK).rstrip("/") + "/" + STATUS_NAME


def read_status_json(uri: str, access: storage.S3Access) -> dict[str, Any] | None:
    """The parsed status.json, or None when it is not there (yet) or not readable from here."""
    if not storage.is_s3(uri):
        return None
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        bucket, key = storage.split_uri(uri)
        body = storage.client_for(access).get_object(Bucket=bucket, Key=key)["Body"].read()
        data = json.loads(body)
    except (BotoCoreError, ClientError, ValueError, storage.StorageError) as err:
        logger.debug("no progress from %s: %s", uri, err)
        return None
    return data if isinstance(data, dict) else None
