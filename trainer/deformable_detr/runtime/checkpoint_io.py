"""Read and write torch objects (checkpoints) by local path or s3:// URI, encrypted when a key is given."""
from __future__ import annotations

import io
import os

import torch

from ..errors import UsageError, relative_to_cwd
from . import storage
from .encryption import decrypt, encrypt, is_encrypted
from .logging import get_logger

log = get_logger("checkpoint")


def save_object(obj, path: str, key: str | None = None) -> None:
    """torch.save `obj` to `path` (local file or S3 object) atomically; encrypted with `key` when one is given."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    storage.write_bytes(path, encrypt(data, key) if key else data)


def load_object(path: str, key: str | None = None, map_location="cpu"):
    """Load a checkpoint written by `save_object` (or any plain .pth file)."""
    if not storage.is_remote(path) and os.path.isdir(path):
        raise UsageError(f"checkpoint {path} is a folder, expected a file (.pth)")
    if not storage.exists(path):
        raise UsageError(f"checkpoint not found: {path}" + relative_to_cwd(path))
    if storage.is_s3(path):  # weights every rank and attempt on a node reads: one download, kept in the node cache
        from .object_cache import info_of, node_cache

        with open(node_cache().fetch(info_of(path)), "rb") as fh:
            raw = fh.read()
    else:
        raw = storage.read_bytes(path)
    if key and not is_encrypted(raw):
        log.warning("-k: checkpoint %s is not encrypted; the key is not needed to read it", path)
    data = decrypt(raw, key, name=f"checkpoint {path}")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as err:  # any unreadable content: one line, never a traceback or a half-loaded object
        # torch's first sentence says what failed; the rest is advice that fills a screen.
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0].rstrip(".")
        raise UsageError(f"checkpoint {path} is truncated or not a PyTorch checkpoint ({reason})") from None
