"""Encrypted checkpoints (-k): round trip, wrong/missing key, damage, and no plain-torch loading."""
from __future__ import annotations

import os

import pytest
import torch

from deformable_detr.errors import UsageError
from deformable_detr.runtime import checkpoint_io
from deformable_detr.runtime.encryption import MAGIC, decrypt, encrypt, is_encrypted


@pytest.fixture
def state():
    torch.manual_seed(0)
    return {"model": {"class_embed.0.weight": torch.randn(4, 8)}, "epoch": 7}


def test_round_trip_with_the_key(tmp_path, state):
    path = str(tmp_path / "model.pth")
    checkpoint_io.save_object(state, path, key="s3cret")
    raw = open(path, "rb").read()
    assert is_encrypted(raw)
    assert b"class_embed" not in raw, "names of tensors must not be readable in the encrypted file"
    loaded = checkpoint_io.load_object(path, key="s3cret")
    assert loaded["epoch"] == 7
    assert torch.equal(loaded["model"]["class_embed.0.weight"], state["model"]["class_embed.0.weight"])


def test_without_a_key_checkpoints_are_plain_torch(tmp_path, state):
    path = str(tmp_path / "model.pth")
    checkpoint_io.save_object(state, path)
    assert torch.load(path, weights_only=False)["epoch"] == 7
    # A plain checkpoint still loads when a key is set (e.g. pretrained weights in an encrypted run).
    assert checkpoint_io.load_object(path, key="s3cret")["epoch"] == 7


def test_wrong_or_missing_key_is_one_clear_line(tmp_path, state):
    path = str(tmp_path / "model.pth")
    checkpoint_io.save_object(state, path, key="s3cret")
    with pytest.raises(UsageError) as wrong:
        checkpoint_io.load_object(path, key="not-it")
    assert str(wrong.value) == f"checkpoint {path}: wrong key (-k); it does not decrypt this checkpoint"
    with pytest.raises(UsageError) as missing:
        checkpoint_io.load_object(path)
    assert str(missing.value) == (f"checkpoint {path} is encrypted; pass its key with -k KEY "
                                  "(or encryption_key in the spec)")


def test_encrypted_file_is_not_loadable_as_plain_torch(tmp_path, state):
    path = str(tmp_path / "model.pth")
    checkpoint_io.save_object(state, path, key="s3cret")
    with pytest.raises(Exception):
        torch.load(path, weights_only=False)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


def test_chunks_detect_truncation_reordering_and_tampering():
    data = os.urandom(10_000)
    sealed = encrypt(data, "k", chunk_size=1024)
    assert decrypt(sealed, "k", chunk_size=1024) == data
    header = len(MAGIC) + 32
    chunk = 1024 + 16
    first, second = sealed[header:header + chunk], sealed[header + chunk:header + 2 * chunk]
    damaged = {
        "truncated at a chunk boundary": sealed[:header + 3 * chunk],
        "truncated inside a chunk": sealed[:-5],
        "two chunks swapped": sealed[:header] + second + first + sealed[header + 2 * chunk:],
        "one bit flipped": sealed[:header + 50] + bytes([sealed[header + 50] ^ 1]) + sealed[header + 51:],
    }
    for blob in damaged.values():
        with pytest.raises(UsageError, match="corrupt or truncated"):
            decrypt(blob, "k", chunk_size=1024)
    assert decrypt(encrypt(b"", "k"), "k") == b""


def test_garbage_checkpoint_is_one_clear_line(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(UsageError, match=r"is truncated or not a PyTorch checkpoint") as caught:
        checkpoint_io.load_object(str(path))
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="checkpoint not found"):
        checkpoint_io.load_object(str(tmp_path / "absent.pth"))
