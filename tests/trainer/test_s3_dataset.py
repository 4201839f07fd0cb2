"""Datasets read from S3 through the node-local object cache, against moto's S3 app served on 127.0.0.1.

The server here is moto's WSGI app behind a middleware that records every request (method, path), so a
test can count the GETs a run made; a TCP proxy in front of it (test_s3.CuttingProxy) stops the endpoint
mid-run for real (connections dropped, new ones refused).
"""
from __future__ import annotations

import json
import os
import threading
import uuid

import pytest
import torch
from werkzeug.serving import make_server

from deformable_detr import exit_codes
from deformable_detr.cli import main
from deformable_detr.data import remote
from deformable_detr.runtime import object_cache, storage
from deformable_detr.runtime.checkpoint import LATEST_NAME, load_checkpoint
from test_s3 import CuttingProxy
from test_train import tiny_train_spec


class CountingS3:
    """moto's S3 app on 127.0.0.1 with a log of (method, path) per request; `on_request` may watch them."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app

        self.app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str]] = []
        self.on_request = None
        self.server = make_server("127.0.0.1", 0, self._handle, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handle(self, environ, start_response):
        entry = (environ["REQUEST_METHOD"], environ["PATH_INFO"])
        self.requests.append(entry)
        if self.on_request is not None:
            self.on_request(entry)
        return self.app(environ, start_response)

    def object_gets(self, bucket: str, suffix: str = "") -> list[str]:
        """Paths of the GetObject calls on `bucket` (listings are GETs of the bucket itself: not counted)."""
        return [path for method, path in self.requests
                if method == "GET" and path.startswith(f"/{bucket}/") and path.endswith(suffix)]


@pytest.fixture(scope="module")
def counting_s3():
    from moto import settings

    settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    server = CountingS3()
    yield server
    server.server.shutdown()


@pytest.fixture
def s3_env(counting_s3, monkeypatch, tmp_path):
    """Storage pointed at the counting server, a fresh node cache; returns a function making a bucket."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("S3_ENDPOINT_URL", counting_s3.url)
    monkeypatch.setenv(object_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(remote, "_listed", {})
    monkeypatch.setattr(remote, "_known", {})
    counting_s3.requests.clear()
    counting_s3.on_request = None
    yield counting_s3
    counting_s3.on_request = None


def _upload_folder(local: str, uri: str) -> None:
    for root, _dirs, names in os.walk(local):
        for name in names:
            path = os.path.join(root, name)
            storage.upload_file(path, storage.join(uri, os.path.relpath(path, local)))


@pytest.fixture
def s3_coco(s3_env, tiny_coco):
    """tiny_coco's train and val splits in a fresh bucket: (bucket name, sources as s3:// URIs)."""
    name = f"ds-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    sources = {}
    for split in ("train", "val"):
        _upload_folder(tiny_coco[split]["image_dir"], f"s3://{name}/{split}/images")
        storage.upload_file(tiny_coco[split]["json_file"], f"s3://{name}/{split}/annotations.json")
        sources[split] = {"image_dir": f"s3://{name}/{split}/images",
                          "json_file": f"s3://{name}/{split}/annotations.json"}
    s3_env.requests.clear()
    return name, sources


def _s3_spec(tiny_coco, sources, results, workers: int = 0) -> dict:
    spec = tiny_train_spec(tiny_coco, results, batch_size=2, num_epochs=2)
    spec["dataset"].update(train_data_sources=[sources["train"]], val_data_sources=[sources["val"]], workers=workers)
    return spec


def _weights(results) -> dict:
    return load_checkpoint(str(results / "train" / LATEST_NAME))["model"]


def test_training_from_s3_gives_the_weights_of_local_files_and_a_rerun_gets_nothing_cached(
        tiny_coco, s3_env, s3_coco, tmp_path, write_spec):
    bucket, sources = s3_coco
    local = tiny_train_spec(tiny_coco, tmp_path / "local", batch_size=2, num_epochs=2)
    assert main(["train", "-e", write_spec(local, "local.yaml")]) == 0

    # Loader workers (forked) and the prefetch threads share the cache through its file locks.
    assert main(["train", "-e", write_spec(_s3_spec(tiny_coco, sources, tmp_path / "s3", workers=2), "s3.yaml")]) == 0
    reference, from_s3 = _weights(tmp_path / "local"), _weights(tmp_path / "s3")
    assert reference.keys() == from_s3.keys()
    assert all(torch.equal(reference[k], from_s3[k]) for k in reference)
    # One GET per object (8 + 4 images, 2 JSON files), however many epochs, workers and prefetch threads read it.
    gets = s3_env.object_gets(bucket)
    assert len(gets) == len(set(gets)) == 8 + 4 + 2, gets

    s3_env.requests.clear()
    assert main(["train", "-e", write_spec(_s3_spec(tiny_coco, sources, tmp_path / "again"), "again.yaml")]) == 0
    assert s3_env.object_gets(bucket) == []  # the node cache held every object: listings and HEADs only
    assert all(torch.equal(reference[k], v) for k, v in _weights(tmp_path / "again").items())
