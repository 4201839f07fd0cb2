"""Read and write torch objects (checkpoints) by local path or s3:// URI, encrypted when a key is given."""
from __future__ import annotations

import io

import torch

from ..errors import UsageError
from . import storage
from .encryption import decrypt, encrypt


def save_object(obj, path: str, key: str | None = None) -> None:
    """torch.save `obj` to `path` (local file or S3 object) atomically; encrypted with `key` when one is given."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    storage.write_bytes(path, encrypt(data, key) if key else data)


def load_object(path: str, key: str | None = None, map_location="cpu"):
    """Load a checkpoint written by `save_object` (or any plain .pth file)."""
    if not storage.exists(path):
        raise UsageError(f"checkpoint not found: {path}")
    data = decrypt(storage.read_bytes(path), key, name=f"checkpoint {path}")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as err:  # any unreadable content: one line, never a traceback or a half-loaded object
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"checkpoint {path} cannot be read as a PyTorch checkpoint: {reason}") from None
