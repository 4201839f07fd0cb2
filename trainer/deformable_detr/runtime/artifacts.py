"""Background upload of a run's local artifacts to its remote results folder (S3), and recovery of
what an earlier run left in its staging folder.

One worker thread uploads in order, so a slow bucket never stalls training; the remote latest moves
only once its checkpoint is complete. The staging rules: docs/architecture.md, "Train outputs".
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from . import storage
from .files import write_text_atomic
from .logging import get_logger
from .status_file import STATUS_NAME, parse_status, read_status
from .storage import StorageError
from .training_log import LOG_NAME

log = get_logger("artifacts")

DEFAULT_LATEST_NAME = "dd_model_latest.pth"
STAGING_ENV = "DDETR_STAGING_DIR"


def staging_root() -> str:
    return os.environ.get(STAGING_ENV) or os.path.join(tempfile.gettempdir(), "ddetr-train-staging")


def staging_dir(remote_uri: str) -> str:
    """The local folder a run with results in `remote_uri` writes before uploading: the same for every
    run (and restarted pod) with that results folder on this disk."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", remote_uri.rstrip("/")).strip("_.") or "results"
    return os.path.join(staging_root(), name)


@dataclass(frozen=True)
class _Task:
    relpath: str
    latest_name: Optional[str] = None  # set for checkpoints: copy to this name once uploaded


class ArtifactSync:
    """Mirror files written under `local_dir` to `remote_uri` (an s3:// URI or another folder).

    With `remote_uri` None, or the same folder as `local_dir`, every method does nothing.
    With `remove_uploaded_checkpoints`, a checkpoint's local file is deleted once it is safely
    remote (a staging folder on a pod's disk then holds at most the checkpoints in flight).
    """

    def __init__(self, local_dir: str, remote_uri: Optional[str], attempts: int = 3,
                 backoff_seconds: float = 2.0, part_size: Optional[int] = None,
                 remove_uploaded_checkpoints: bool = False):
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.local_dir = local_dir
        self.remote_uri = remote_uri.rstrip("/") if remote_uri else None
        self.enabled = bool(self.remote_uri) and not (
            not storage.is_remote(self.remote_uri) and os.path.abspath(self.remote_uri) == os.path.abspath(local_dir))
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.part_size = part_size
        self.remove_uploaded_checkpoints = remove_uploaded_checkpoints
        self._queue: deque[_Task] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._failures: dict[str, str] = {}  # relpath -> last error, cleared by a later success
        self._retryable: dict[str, bool] = {}  # relpath -> whether its failure may pass on its own
        self.latest: dict[str, str] = {}  # latest name -> checkpoint relpath it names remotely

    # ------------------------------------------------------------ caller side

    def remote_path(self, relpath: str) -> str:
        return storage.join(self.remote_uri or "", relpath)

    def upload(self, relpath: str) -> None:
        """Queue `local_dir/relpath` for upload to `remote_uri/relpath`; returns at once."""
        self._submit(_Task(relpath))

    def publish_checkpoint(self, relpath: str, latest_name: str = DEFAULT_LATEST_NAME) -> None:
        """Queue a checkpoint; once it is fully uploaded, the remote `latest_name` becomes a copy of it."""
        self._submit(_Task(relpath, latest_name))

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until everything queued so far is uploaded (or given up); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    @property
    def error(self) -> Optional[str]:
        """One line describing the uploads that failed for good, or None."""
        with self._cond:
            if not self._failures:
                return None
            first = next(iter(self._failures.values()))
            count = len(self._failures)
            kept = "; ".join(f"remote {name} still names {path}" for name, path in self.latest.items())
        return f"{count} artifact(s) not uploaded to {self.remote_uri} (first: {first})" + (f"; {kept}" if kept else "")

    @property
    def not_uploaded(self) -> list[str]:
        """The files whose upload failed for good (still in `local_dir`), in the order they were queued."""
        with self._cond:
            return list(self._failures)

    def close(self) -> None:
        """Finish queued uploads, stop the worker, and raise StorageError if any upload failed for good."""
        if not self.enabled:
            return
        self.wait()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        message = self.error
        if message:
            with self._cond:
                retryable = all(self._retryable.get(name, True) for name in self._failures)
            raise StorageError(message, retryable=retryable)

    def __enter__(self) -> "ArtifactSync":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: report upload failures without hiding the original error
            self.close()
        except StorageError as err:
            log.error("%s", err)

    def _submit(self, task: _Task) -> None:
        if not self.enabled:
            return
        with self._cond:
            if self._closed:
                raise RuntimeError("ArtifactSync is closed")
            # A file queued twice before its upload starts is uploaded once, with its newest content.
            if task not in self._queue:
                self._queue.append(task)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="artifact-sync", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    # ------------------------------------------------------------ worker side

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                task = self._queue.popleft()
                self._busy = True
            try:
                self._run(task)
            except Exception as err:  # never let the worker die: wait() and close() must always return
                log.exception("upload of %s failed unexpectedly", task.relpath)
                with self._cond:
                    self._failures[task.relpath] = f"{type(err).__name__}: {err}"
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _run(self, task: _Task) -> None:
        local = os.path.join(self.local_dir, task.relpath)
        if not os.path.isfile(local):
            # Removed locally before its turn (an older checkpoint rotated away): nothing to mirror.
            log.warning("not uploading %s: it no longer exists locally", local)
            return
        started = time.monotonic()
        remote = self.remote_path(task.relpath)
        if not self._with_retries(task.relpath, lambda: storage.upload_file(local, remote, part_size=self.part_size)):
            return
        if task.latest_name:
            latest = self.remote_path(task.latest_name)
            if not self._with_retries(task.relpath, lambda: storage.copy(remote, latest)):
                return
            with self._cond:
                self.latest[task.latest_name] = task.relpath
            log.info("uploaded checkpoint %s (%.1f MB in %.1fs); %s now names it", remote,
                     os.path.getsize(local) / 1e6, time.monotonic() - started, latest)
            if self.remove_uploaded_checkpoints:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(local)

    def _with_retries(self, relpath: str, action) -> bool:
        for attempt in range(1, self.attempts + 1):
            try:
                action()
            except (StorageError, OSError) as err:
                retryable = getattr(err, "retryable", True)  # a local read error may pass (NFS hiccup)
                if attempt == self.attempts or not retryable:
                    log.error("giving up on %s after %d attempt(s): %s", relpath, attempt, err)
                    with self._cond:
                        self._failures[relpath] = f"{relpath} after {attempt} attempt(s): {err}"
                        self._retryable[relpath] = bool(retryable)
                    return False
                delay = self.backoff_seconds * 2 ** (attempt - 1)
                log.warning("upload of %s failed (attempt %d/%d), retrying in %.1fs: %s",
                            relpath, attempt, self.attempts, delay, err)
                time.sleep(delay)
            else:
                with self._cond:
                    self._failures.pop(relpath, None)
                    self._retryable.pop(relpath, None)
                return True
        return False


def _remote_status_step(remote_uri: str) -> int:
    try:
        status = parse_status(storage.read_bytes(storage.join(remote_uri, STATUS_NAME)))
    except storage.ArtifactNotFound:
        return -1
    return -1 if status is None else int(status.get("step") or 0)


def _local_status_step(local_dir: str) -> int:
    status = read_status(local_dir)
    return -1 if status is None else int(status.get("step") or 0)


def _clear_not_uploaded(local_dir: str) -> None:
    path = os.path.join(local_dir, STATUS_NAME)
    try:
        with open(path, "rb") as fh:
            raw = json.loads(fh.read())
    except (OSError, ValueError):
        return
    if isinstance(raw, dict) and raw.pop("not_uploaded", None) is not None:
        write_text_atomic(path, json.dumps(raw, indent=2) + "\n")


def recover_staging(local_dir: str, remote_uri: str, attempts: int = 3, backoff_seconds: float = 2.0,
                    log_names: tuple[str, ...] = (LOG_NAME, STATUS_NAME)) -> list[str]:
    """Upload what an earlier run left in its staging folder `local_dir`; the names uploaded.

    Checkpoints still there were never uploaded (uploaded ones leave the disk): each goes up,
    and the remote latest moves to the newest only when it is newer than every remote checkpoint
    (a stale staging folder never moves it back). The log and status go up when the staged status
    counts more steps than the remote one. Raises StorageError (naming the folder) when an upload fails.
    """
    from .checkpoint import list_checkpoints
    from .files import remove_partial_writes

    if not os.path.isdir(local_dir):
        return []
    remove_partial_writes(local_dir)
    staged = list_checkpoints(local_dir)
    upload_logs = all(os.path.isfile(os.path.join(local_dir, n)) for n in log_names) and \
        _local_status_step(local_dir) > _remote_status_step(remote_uri)
    if not staged and not upload_logs:
        return []
    log.warning("uploading what an earlier run left in its staging folder %s to %s", local_dir, remote_uri)
    remote = list_checkpoints(remote_uri)
    newest_remote = remote[-1].step if remote else -1
    sync = ArtifactSync(local_dir, remote_uri, attempts=attempts, backoff_seconds=backoff_seconds,
                        remove_uploaded_checkpoints=True)
    done = []
    for ref in staged:
        name = os.path.basename(ref.path)
        if ref is staged[-1] and ref.step > newest_remote:
            sync.publish_checkpoint(name)
        else:
            sync.upload(name)
        done.append(name)
    if upload_logs:
        _clear_not_uploaded(local_dir)  # uploaded after the checkpoints it lists, so no longer true there
        for name in log_names:
            sync.upload(name)
            done.append(name)
    try:
        sync.close()
    except StorageError as err:
        raise StorageError(f"{err}; what is not uploaded stays in {local_dir}", retryable=err.retryable) from None
    for ref in staged:  # uploaded without a latest copy: nothing removed them yet
        with contextlib.suppress(FileNotFoundError):
            os.remove(ref.path)
    return done
