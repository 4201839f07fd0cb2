"""Atomic, durable writes: write to a temporary name beside the target, fsync, then rename.

The file gets the mode any file the user creates gets (0666 less the umask), not the
0600 of a temporary file, unless the caller asks for a private file (one holding a key).
A full disk (ENOSPC, EDQUOT) ends in one `DiskFull` line naming the path and the space
needed; the target is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Iterator, Optional

from .. import exit_codes
from ..errors import UsageError

EXIT_DISK_FULL = exit_codes.DISK_FULL.code
_FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UsageError):
    """No space (or quota) left to write a file: one line, exit 202 (retryable)."""

    exit_code = EXIT_DISK_FULL


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _FULL_DISK_ERRNOS


def disk_full_error(path: str, needed: Optional[int] = None) -> DiskFull:
    """The one-line error for a write to `path` that ran out of space (`needed` bytes, when known)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = _megabytes(shutil.disk_usage(folder).free) + " free"
    except OSError:
        free = "free space unknown"
    need = f"needs {_megabytes(needed)}" if needed is not None else "needs more space"
    return DiskFull(f"no space left on device writing {path}: {need}, {free} in {folder}; "
                    "free some space (nothing already written was changed)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(folder: str) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, private: bool = False, size: Optional[int] = None) -> Iterator[str]:
    """Yield a temporary path; on success it is fsync'd and replaces `path`, on error it is removed.

    `private` keeps the file 0600 (for files holding a secret); otherwise it gets 0666 & ~umask.
    `size` (bytes about to be written) goes into the message should the disk be full.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, size) from None
        raise
    try:
        os.fchmod(fd, 0o600 if private else 0o666 & ~_umask())
    finally:
        os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the bytes reach the disk before the name points at them
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(folder)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if is_disk_full(err):
            raise disk_full_error(path, size) from None
        raise


def write_text_atomic(path: str, text: str, private: bool = False) -> None:
    data = text.encode("utf-8")
    with atomic_path(path, private=private, size=len(data)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def remove_partial_writes(folder: str) -> list[str]:
    """Delete the temporary files (`.<name>.<random>.tmp`) a killed process left in `folder`; their names.

    Call it only where no other process is writing into `folder` at the same time.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(os.path.join(folder, name)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed
