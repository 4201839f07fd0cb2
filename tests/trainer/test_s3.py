"""S3 storage, background artifact sync and S3 checkpoints against a real S3 endpoint.

The endpoint is moto's server on 127.0.0.1, spoken to by boto3 over HTTP. Faults are real:
a TCP proxy in front of it that goes away in the middle of an upload, IAM-checked
credentials, a bucket that does not exist, a port nobody listens on.
"""
from __future__ import annotations

import os
import socket
import threading
import uuid

import boto3
import pytest
import torch

from deformable_detr.errors import UsageError
from deformable_detr.runtime import checkpoint_io, storage
from deformable_detr.runtime.artifacts import ArtifactSync
from deformable_detr.runtime.storage import ArtifactNotFound, StorageError

MiB = 1024 * 1024


def _aws_env(monkeypatch, endpoint: str, key_id: str = "testing", secret: str = "testing") -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_RETRY_MODE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")


@pytest.fixture
def bucket(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket on the moto endpoint, with the environment pointing storage at it; returns s3://name."""
    _aws_env(monkeypatch, moto_endpoint)
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


def _direct_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


class CuttingProxy:
    """TCP proxy to the S3 endpoint that stops for good once `cut_after` request bytes went through."""

    def __init__(self, upstream: str, cut_after: int | None = None):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.forwarded = 0
        self.cut = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, upstream: bool) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
                if upstream:
                    with self._lock:
                        self.forwarded += len(chunk)
                    if self.cut_after is not None and self.forwarded >= self.cut_after:
                        self.stop()
                        return
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        """The endpoint goes away: open connections are dropped and new ones are refused."""
        self.cut.set()
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def _one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------- storage


def test_bytes_text_exists_and_listing_round_trip(bucket):
    storage.write_bytes(f"{bucket}/run/train/a.bin", b"\x00\x01payload")
    storage.write_text(f"{bucket}/run/train/sub/status.json", '{"epoch": 1}')
    storage.write_text(f"{bucket}/run/train_other/x.txt", "not below run/train/")

    assert storage.read_bytes(f"{bucket}/run/train/a.bin") == b"\x00\x01payload"
    assert storage.read_bytes(f"{bucket}/run/train/sub/status.json") == b'{"epoch": 1}'
    assert storage.exists(f"{bucket}/run/train/a.bin")
    assert not storage.exists(f"{bucket}/run/train/missing.bin")
    assert storage.list_files(f"{bucket}/run/train") == [f"{bucket}/run/train/a.bin",
                                                         f"{bucket}/run/train/sub/status.json"]
    assert storage.list_files(f"{bucket}/nothing/here") == []
    with pytest.raises(ArtifactNotFound, match="file not found: s3://"):
        storage.read_bytes(f"{bucket}/run/train/missing.bin")


def test_endpoint_and_region_come_from_the_standard_variables(bucket, moto_endpoint, monkeypatch):
    monkeypatch.delenv("S3_ENDPOINT_URL")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    storage.write_text(f"{bucket}/via-aws-endpoint.txt", "ok")
    assert storage.read_bytes(f"{bucket}/via-aws-endpoint.txt") == b"ok"
    client = storage.s3_client()
    assert client.meta.endpoint_url == moto_endpoint and client.meta.region_name == "eu-west-1"


def test_large_file_goes_up_in_parts_and_comes_back_whole(bucket, tmp_path, moto_endpoint):
    payload = os.urandom(11 * MiB)
    local = tmp_path / "big.pth"
    local.write_bytes(payload)
    storage.upload_file(str(local), f"{bucket}/ckpt/big.pth", part_size=5 * MiB)

    name = bucket.removeprefix("s3://")
    etag = _direct_client(moto_endpoint).head_object(Bucket=name, Key="ckpt/big.pth")["ETag"]
    assert etag.strip('"').endswith("-3"), "an 11 MiB file in 5 MiB parts is a 3-part multipart upload"
    back = tmp_path / "back" / "big.pth"
    storage.download(f"{bucket}/ckpt/big.pth", str(back))
    assert back.read_bytes() == payload
    assert storage.read_bytes(f"{bucket}/ckpt/big.pth") == payload


def test_missing_bucket_is_one_clear_line(moto_endpoint, monkeypatch, tmp_path):
    _aws_env(monkeypatch, moto_endpoint)
    uri = "s3://no-such-bucket-here/run/x.pth"
    local = tmp_path / "x.pth"
    local.write_bytes(b"x")
    for action in (lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"x"),
                   lambda: storage.exists(uri), lambda: storage.list_files("s3://no-such-bucket-here/run"),
                   lambda: storage.upload_file(str(local), uri),
                   lambda: storage.download(uri, str(tmp_path / "y.pth"))):
        with pytest.raises(StorageError) as caught:
            action()
        assert "bucket 'no-such-bucket-here' does not exist" in _one_line(caught.value)
    assert not (tmp_path / "y.pth").exists()


def test_wrong_credentials_are_one_clear_line(moto_endpoint, monkeypatch):
    # moto checks signatures against its IAM users once its no-auth allowance is used up.
    from moto import settings

    _aws_env(monkeypatch, moto_endpoint)
    iam = boto3.client("iam", endpoint_url=moto_endpoint, region_name="us-east-1")
    user = f"trainer-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)

    _aws_env(monkeypatch, moto_endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    storage.write_text(f"s3://{name}/ok.txt", "the right key works")
    assert storage.read_bytes(f"s3://{name}/ok.txt") == b"the right key works"

    for key_id, secret in (("AKIAUNKNOWNKEY000000", "whatever"), (key["AccessKeyId"], "wrong-secret")):
        _aws_env(monkeypatch, moto_endpoint, key_id, secret)
        for action in (lambda: storage.write_text(f"s3://{name}/x.txt", "x"),
                       lambda: storage.read_bytes(f"s3://{name}/ok.txt"),
                       lambda: storage.exists(f"s3://{name}/ok.txt"),
                       lambda: storage.list_files(f"s3://{name}/")):
            with pytest.raises(StorageError) as caught:
                action()
            assert "rejected the credentials" in _one_line(caught.value)


def test_unreachable_endpoint_is_one_clear_line(monkeypatch):
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _aws_env(monkeypatch, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError) as caught:
        storage.write_text("s3://some-bucket/x.txt", "x")
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in _one_line(caught.value)
    assert caught.value.retryable


def test_checkpoints_in_s3_plain_and_encrypted(bucket):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}
    checkpoint_io.save_object(state, f"{bucket}/train/model_epoch_003.pth")
    checkpoint_io.save_object(state, f"{bucket}/train/secret.pth", key="k3y")
    for path, key in ((f"{bucket}/train/model_epoch_003.pth", None), (f"{bucket}/train/secret.pth", "k3y")):
        loaded = checkpoint_io.load_object(path, key=key)
        assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    with pytest.raises(UsageError, match="wrong key"):
        checkpoint_io.load_object(f"{bucket}/train/secret.pth", key="other")
    with pytest.raises(UsageError, match="checkpoint not found"):
        checkpoint_io.load_object(f"{bucket}/train/model_epoch_999.pth")


# ---------------------------------------------------------------- background sync


def test_sync_uploads_files_and_moves_latest_after_each_checkpoint(bucket, tmp_path):
    local = tmp_path / "train"
    local.mkdir()
    sync = ArtifactSync(str(local), f"{bucket}/run/train", backoff_seconds=0.05)
    (local / "status.json").write_text('{"epoch": 0}')
    sync.upload("status.json")
    for epoch in (1, 2):
        name = f"model_epoch_{epoch:03d}.pth"
        (local / name).write_bytes(f"weights of epoch {epoch}".encode())
        sync.publish_checkpoint(name)
    assert sync.wait(timeout=60)
    sync.close()

    assert storage.read_bytes(f"{bucket}/run/train/dd_model_latest.pth") == b"weights of epoch 2"
    assert storage.list_files(f"{bucket}/run/train") == [
        f"{bucket}/run/train/{name}" for name in
        ("dd_model_latest.pth", "model_epoch_001.pth", "model_epoch_002.pth", "status.json")]
    assert sync.latest == {"dd_model_latest.pth": "model_epoch_002.pth"}
    assert (local / "model_epoch_001.pth").exists(), "local files are kept unless asked otherwise"


def test_sync_can_free_the_staging_disk_once_checkpoints_are_remote(bucket, tmp_path):
    (tmp_path / "model_epoch_001.pth").write_bytes(b"epoch 1")
    (tmp_path / "status.json").write_text("{}")
    with ArtifactSync(str(tmp_path), f"{bucket}/run", remove_uploaded_checkpoints=True) as sync:
        sync.publish_checkpoint("model_epoch_001.pth")
        sync.upload("status.json")
    assert sorted(os.listdir(tmp_path)) == ["status.json"]
    assert storage.read_bytes(f"{bucket}/run/dd_model_latest.pth") == b"epoch 1"


def test_endpoint_stopping_mid_upload_keeps_latest_on_the_previous_checkpoint(bucket, tmp_path, moto_endpoint,
                                                                              monkeypatch):
    proxy = CuttingProxy(moto_endpoint)
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
    local = tmp_path / "train"
    local.mkdir()
    sync = ArtifactSync(str(local), f"{bucket}/run/train", attempts=2, backoff_seconds=0.05, part_size=5 * MiB)
    (local / "model_epoch_001.pth").write_bytes(b"good epoch 1")
    sync.publish_checkpoint("model_epoch_001.pth")
    assert sync.wait(timeout=60) and sync.error is None

    proxy.cut_after = proxy.forwarded + 3 * MiB  # the endpoint goes away inside the next upload
    (local / "model_epoch_002.pth").write_bytes(os.urandom(12 * MiB))
    sync.publish_checkpoint("model_epoch_002.pth")
    with pytest.raises(StorageError) as caught:
        sync.close()
    message = _one_line(caught.value)
    assert proxy.cut.is_set()
    assert "not uploaded" in message and "model_epoch_002.pth after 2 attempt(s)" in message
    assert "cannot reach the S3 endpoint" in message
    assert "dd_model_latest.pth still names model_epoch_001.pth" in message

    direct = _direct_client(moto_endpoint)  # the store itself, behind the dead proxy
    name = bucket.removeprefix("s3://")
    assert direct.get_object(Bucket=name, Key="run/train/dd_model_latest.pth")["Body"].read() == b"good epoch 1"
    keys = [item["Key"] for item in direct.list_objects_v2(Bucket=name, Prefix="run/")["Contents"]]
    assert "run/train/model_epoch_002.pth" not in keys


def test_sync_to_nowhere_or_to_itself_does_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    for remote in (None, str(tmp_path)):
        sync = ArtifactSync(str(tmp_path), remote)
        assert not sync.enabled
        sync.upload("a.txt")
        sync.publish_checkpoint("a.txt")
        assert sync.wait(timeout=1)
        sync.close()
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_unknown_profile_is_one_clear_line(monkeypatch, moto_endpoint):
    _aws_env(monkeypatch, moto_endpoint)
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(StorageError) as caught:
        storage.exists("s3://some-bucket/x")
    assert "no-such-profile" in _one_line(caught.value) and "AWS_PROFILE" in str(caught.value)
