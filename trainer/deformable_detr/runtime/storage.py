"""Reading and writing artifacts by path. Local paths now; `s3://` URIs come with the storage issue."""
from __future__ import annotations

import os

from ..errors import UsageError
from .files import atomic_path


def is_remote(path: str) -> bool:
    return "://" in path


def _local(path: str) -> str:
    if is_remote(path):
        raise UsageError(f"{path}: remote storage is not built yet; use a local path")
    return path


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(_local(path)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path: str) -> bytes:
    try:
        with open(_local(path), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None


def exists(path: str) -> bool:
    return os.path.exists(_local(path))
