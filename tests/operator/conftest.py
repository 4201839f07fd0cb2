"""Fixtures for the operator tests: DeformableDetrJob bodies and a real S3 endpoint."""
from __future__ import annotations

import copy
import datetime as dt

import pytest

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)

BASE_JOB = {
    "apiVersion": "ddetr.dev/v1alpha1",
    "kind": "DeformableDetrJob",
    "metadata": {"name": "demo", "namespace": "ml", "uid": "0000-1111"},
    "spec": {
        "image": "trainer:test",
        "nodes": 2,
        "gpusPerNode": 4,
        "artifacts": {"uri": "s3://bucket/runs/demo", "endpoint": "http://s3.local:9000",
                      "credentialsSecret": {"name": "s3-creds"}},
        "experiment": {"train": {"num_epochs": 3}, "dataset": {"num_classes": 4}},
    },
}


@pytest.fixture(autouse=True)
def fresh_uri_cache():
    """Each test its own status.json URI cache: tests reuse job uids (and KMock keeps no generation),
    which an API server never does."""
    try:
        from ddetr_operator import passes
    except ImportError:  # the tests that need no operator package (Dockerfiles, chart lint) still run
        yield
        return
    passes._URIS.clear()
    yield
    passes._URIS.clear()


@pytest.fixture
def make_job():
    """A DeformableDetrJob body; keyword arguments update `spec` (nested dicts replace)."""
    def _make(status: dict | None = None, labels: dict | None = None, **spec) -> dict:
        job = copy.deepcopy(BASE_JOB)
        job["spec"].update(spec)
        if status is not None:
            job["status"] = status
        if labels:
            job["metadata"]["labels"] = labels
        return job
    return _make


@pytest.fixture
def moto_s3():
    """moto's S3 server on 127.0.0.1 with a bucket `runs`; yields (endpoint, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from operator_objects import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test-key", aws_secret_access_key="test-secret")
    client.create_bucket(Bucket="runs")
    yield endpoint, client
    server.stop()
