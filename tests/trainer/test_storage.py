"""Local-path side of runtime.storage: atomic writes, listing, copies, and the scheme check."""
from __future__ import annotations

import logging
import os

import pytest

from deformable_detr.runtime import storage
from deformable_detr.runtime.artifacts import ArtifactSync
from deformable_detr.runtime.files import atomic_path
from deformable_detr.runtime.storage import ArtifactNotFound, StorageError


def test_local_round_trip_and_listing_skip_writes_in_progress(tmp_path):
    storage.write_bytes(str(tmp_path / "run" / "a.bin"), b"abc")
    storage.write_text(str(tmp_path / "run" / "sub" / "b.txt"), "text")
    assert storage.read_bytes(str(tmp_path / "run" / "a.bin")) == b"abc"
    assert storage.exists(str(tmp_path / "run" / "sub" / "b.txt"))
    assert not storage.exists(str(tmp_path / "run" / "c.txt"))

    with pytest.raises(RuntimeError):
        with atomic_path(str(tmp_path / "run" / "half.pth")) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half")
            # While a write is in progress its temporary file must not be listed as an artifact.
            assert storage.list_files(str(tmp_path / "run")) == [str(tmp_path / "run" / "a.bin"),
                                                                 str(tmp_path / "run" / "sub" / "b.txt")]
            raise RuntimeError("crash mid-write")
    assert not os.path.exists(tmp_path / "run" / "half.pth")
    assert storage.list_files(str(tmp_path / "never-made")) == []
    with pytest.raises(ArtifactNotFound, match="file not found: .*c.txt"):
        storage.read_bytes(str(tmp_path / "run" / "c.txt"))


def test_local_upload_download_and_copy(tmp_path):
    source = tmp_path / "model.pth"
    source.write_bytes(b"weights")
    storage.upload_file(str(source), str(tmp_path / "remote" / "model.pth"))
    storage.download(str(tmp_path / "remote" / "model.pth"), str(tmp_path / "back" / "model.pth"))
    storage.copy(str(tmp_path / "remote" / "model.pth"), str(tmp_path / "remote" / "latest.pth"))
    for path in ("remote/model.pth", "back/model.pth", "remote/latest.pth"):
        assert (tmp_path / path).read_bytes() == b"weights"
    with pytest.raises(ArtifactNotFound):
        storage.upload_file(str(tmp_path / "missing.pth"), str(tmp_path / "remote" / "x.pth"))
    with pytest.raises(ArtifactNotFound):
        storage.download(str(tmp_path / "missing.pth"), str(tmp_path / "x.pth"))


def test_unsupported_scheme_and_bad_uri_are_usage_errors(tmp_path):
    with pytest.raises(StorageError, match="unsupported storage scheme 'gs://'; accepted: a local path or s3://"):
        storage.read_bytes("gs://bucket/x.pth")
    with pytest.raises(StorageError, match="no bucket"):
        storage.write_text("s3:///x.txt", "x")
    assert storage.join("s3://b/run/", "train", "x.pth") == "s3://b/run/train/x.pth"
    assert storage.join(str(tmp_path), "train") == os.path.join(str(tmp_path), "train")


def test_sync_to_another_folder_mirrors_files_and_latest(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "mirror"
    local.mkdir()
    (local / "model_epoch_001.pth").write_bytes(b"epoch 1")
    with ArtifactSync(str(local), str(remote)) as sync:
        sync.publish_checkpoint("model_epoch_001.pth", latest_name="model_latest.pth")
        sync.upload("gone.txt")  # removed before its turn: skipped with a warning, not an error
    assert (remote / "model_epoch_001.pth").read_bytes() == b"epoch 1"
    assert (remote / "model_latest.pth").read_bytes() == b"epoch 1"
    assert not (remote / "gone.txt").exists()


def test_sync_that_cannot_write_fails_clearly_at_close(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "model_epoch_001.pth").write_bytes(b"epoch 1")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote folder should be")
    sync = ArtifactSync(str(local), str(blocker), attempts=2, backoff_seconds=0.01)
    sync.publish_checkpoint("model_epoch_001.pth")
    assert sync.wait(timeout=30)
    expected = r"1 artifact\(s\) not uploaded to .*not-a-folder \(first: model_epoch_001.pth after 2 attempt\(s\)"
    with pytest.raises(StorageError, match=expected):
        sync.close()


def test_long_transfers_log_progress(caplog):
    from deformable_detr.runtime.progress import TransferProgress

    # Attached directly: once the CLI has set up logging, "deformable_detr" no longer propagates to root.
    logger = logging.getLogger("deformable_detr.storage")
    logger.addHandler(caplog.handler)
    caplog.set_level("INFO", logger="deformable_detr.storage")
    try:
        shown = TransferProgress("uploading s3://b/k", logger, total=3_000_000, every_s=0.0)
        for _ in range(3):
            shown(1_000_000)
        shown.finish()
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("uploading s3://b/k: 1.0 of 3.0 MB")
    assert lines[-1].startswith("uploading s3://b/k: done, 3.0 MB in")


def test_one_s3_client_per_access_is_reused_and_the_cache_is_bounded():
    """Making a boto3 client costs tens of ms of CPU; the operator asks for one per job's credentials each pass."""
    from deformable_detr.runtime.storage import MAX_CLIENTS, S3Access, _clients, client_for, split_uri

    access = S3Access(endpoint="http://127.0.0.1:9", access_key_id="k", secret_access_key="s", max_attempts=1)
    assert client_for(access) is client_for(S3Access(endpoint="http://127.0.0.1:9", access_key_id="k",
                                                     secret_access_key="s", max_attempts=1))
    assert client_for(access) is not client_for(S3Access(endpoint="http://127.0.0.1:9", access_key_id="other",
                                                         secret_access_key="s", max_attempts=1))
    for port in range(MAX_CLIENTS + 5):
        client_for(S3Access(endpoint=f"http://127.0.0.1:{port + 1}"))
    assert len(_clients) == MAX_CLIENTS
    assert split_uri("s3://bucket/a/b") == ("bucket", "a/b")
