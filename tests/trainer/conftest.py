"""Fixtures shared by the trainer tests: a real S3 endpoint (moto's server on 127.0.0.1), the project's log messages."""
from __future__ import annotations

import logging
import os
import uuid

import pytest


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1, reached over HTTP like any S3-compatible store."""
    from moto import settings
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")  # credentials unchecked unless a test turns IAM on
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def fake_s3_credentials(monkeypatch) -> None:
    """The environment of a test S3 endpoint: its fake credentials, none of the machine's own."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture
def bucket(moto_endpoint, fake_s3_credentials, monkeypatch, request) -> str:
    """A fresh bucket on the moto endpoint, with the environment pointing storage at it; returns s3://name."""
    from deformable_detr.runtime import storage

    monkeypatch.setenv("S3_ENDPOINT_URL", moto_endpoint)
    prefix = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-")[:20]
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def perturbed_checkpoint(tmp_path_factory):
    """Build a model from `spec_dict`, move its weights off their initial values (so outputs differ
    per query) and save it as our checkpoint; returns (model in eval mode, checkpoint path)."""
    def _make(spec_dict: dict, seed: int = 0):
        import torch

        from deformable_detr.config.loader import spec_from_dict
        from deformable_detr.model import build_model
        from deformable_detr.runtime.checkpoint_io import save_object

        torch.manual_seed(seed)
        model, _, _ = build_model(spec_from_dict(spec_dict))
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point() and "running_var" not in name:
                    tensor.add_(torch.randn_like(tensor) * 0.05)
        path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
        save_object({"model": model.state_dict(), "epoch": 0}, path)
        return model.eval(), path
    return _make


@pytest.fixture
def logged():
    """Messages of the project's logger (it does not propagate to caplog)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("deformable_detr")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def _own_staging_folder(tmp_path, monkeypatch):
    # Training with s3:// results stages under a stable folder; each test gets its own.
    monkeypatch.setenv("DDETR_STAGING_DIR", str(tmp_path / "staging"))
    # s3:// datasets and weights are cached on the node (runtime/object_cache.py): each test its own cache.
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path / "object-cache"))
