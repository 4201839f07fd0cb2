"""A task's results folder as the CLI opens it: checked writable before any work (`check_writable`),
held by one writer (`one_writer`), and the effective spec recorded there as experiment.yaml (never
the key) only together with the results it describes, so a refused or stopped run leaves the
folder's record as it was: train records it as it starts (its checkpoints appear as it runs, each
made by this spec) and takes it back when the run ends having written nothing else; every other
task records it after its results, in one block that a stop signal does not split
(`results_recorded`)."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import tempfile
from typing import Iterator, Optional

from ..config.loader import dump_spec
from ..config.schema import ExperimentConfig
from ..errors import UsageError
from ..runtime import storage
from ..runtime.paths import task_results_dir
from ..runtime.writer_lock import LOCK_NAME

EFFECTIVE_SPEC = "experiment.yaml"
# Tasks whose results appear while they run: the spec is recorded first (see the docstring).
SPEC_RECORDED_FIRST = ("train",)


@dataclasses.dataclass
class _FolderBefore:
    """A results folder as it was before the effective spec was written into it."""

    folder: str
    created: list[str]              # local folders that did not exist yet, innermost first
    names: set[str]                 # what the folder held
    previous_spec: Optional[bytes]  # the experiment.yaml it held


_WHY = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def results_dir_field(spec: ExperimentConfig, task: str) -> str:
    """The spec field that names the task's results folder: `{task}.results_dir` if set, else `results_dir` (-r)."""
    return f"{task}.results_dir" if getattr(getattr(spec, task, None), "results_dir", None) else "results_dir"


def check_writable(folder: str, field: str) -> None:
    """Refuse, in one line naming `field` and the path, a local folder this process cannot write into
    (a file in its place or on its path, a read-only mount, no permission); nothing is left behind.

    The folder itself need not exist yet: its nearest existing parent is where it would be created.
    An `s3://` prefix is not probed here (a write there is the check; its errors are one line already).
    """
    if storage.is_remote(folder):
        return
    path = os.path.abspath(folder)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    accepted = "accepted: a folder this process can write"
    if not os.path.isdir(existing):
        what = "is a file, not a folder" if existing == path else "is a file, so the folder cannot be made in it"
        raise UsageError(f"{field}: {folder} cannot be written: {existing} {what}; {accepted}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ddetr-write-check.", dir=existing)
    except OSError as err:
        if err.errno not in _WHY:
            raise  # a full disk and the like: their own errors and exit codes
        raise UsageError(f"{field}: {folder} cannot be written: {existing}: {_WHY[err.errno]}; {accepted}") from None
    os.close(fd)
    os.remove(probe)


def _rank() -> int:
    from ..runtime.distributed import launched_rank  # torch: imported only when a task runs

    return launched_rank()


def record_effective_spec(spec: ExperimentConfig, task: str) -> None:
    """Write the spec a run used as experiment.yaml in its results folder (rank 0 only, atomically)."""
    if _rank() != 0:
        return
    text = dump_spec(dataclasses.replace(spec, encryption_key=None))
    if spec.encryption_key:
        text = "# encryption_key was set (not recorded)\n" + text
    storage.write_text(f"{task_results_dir(spec, task).rstrip('/')}/{EFFECTIVE_SPEC}", text)


def write_effective_spec(spec: ExperimentConfig, task: str) -> Optional[_FolderBefore]:
    """Record the spec a run used (rank 0 only), in its results folder; returns what to undo."""
    if _rank() != 0:
        return None
    folder = task_results_dir(spec, task).rstrip("/")
    if storage.is_remote(folder):
        # An object store has no folders to take back; what it held is listed and kept instead.
        path = f"{folder}/{EFFECTIVE_SPEC}"
        previous = storage.read_bytes(path) if storage.exists(path) else None
        before = _FolderBefore(folder, [], set(storage.list_files(folder)), previous)
    else:
        created, parent = [], os.path.abspath(folder)
        while parent and not os.path.exists(parent):
            created.append(parent)
            parent = os.path.dirname(parent)
        names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        path = os.path.join(folder, EFFECTIVE_SPEC)
        previous = open(path, "rb").read() if os.path.isfile(path) else None
        before = _FolderBefore(folder, created, names, previous)
    record_effective_spec(spec, task)
    return before


def undo_effective_spec(before: Optional[_FolderBefore]) -> None:
    """Put the folder back as it was, unless the task has written something else there."""
    if before is not None and storage.is_remote(before.folder):
        from ..runtime.training_log import LOG_NAME

        path = f"{before.folder}/{EFFECTIVE_SPEC}"
        # The training log records the refused attempt itself; anything else new means the task ran.
        ignored = {path, f"{before.folder}/{LOG_NAME}", f"{before.folder}/{LOCK_NAME}"}
        if set(storage.list_files(before.folder)) - ignored != before.names - ignored:
            return
        if before.previous_spec is not None:
            storage.write_bytes(path, before.previous_spec)
        else:
            storage.delete(path)
        return
    if before is None or not os.path.isdir(before.folder):
        return
    ignored = {EFFECTIVE_SPEC, LOCK_NAME}
    if set(os.listdir(before.folder)) - ignored != before.names - ignored:
        return
    path = os.path.join(before.folder, EFFECTIVE_SPEC)
    if before.previous_spec is not None:
        storage.write_bytes(path, before.previous_spec)
        return
    if os.path.isfile(path):
        os.remove(path)
    for folder in before.created:
        try:
            os.rmdir(folder)
        except OSError:
            break


@contextlib.contextmanager
def one_writer(spec: ExperimentConfig, task: str) -> Iterator[None]:
    """Hold the results folder's writer lock (runtime/writer_lock.py) for the task run inside; a folder
    another run is writing is refused in one line naming that run. One lock per run: its rank 0 (or the
    launcher that starts its workers) takes it."""
    from ..runtime.writer_lock import WriterLock, takes_the_lock

    if not takes_the_lock():
        yield
        return
    with WriterLock(task_results_dir(spec, task), task, results_dir_field(spec, task)):
        yield


@contextlib.contextmanager
def effective_spec_recorded(spec: ExperimentConfig, task: str) -> Iterator[None]:
    """For a task in SPEC_RECORDED_FIRST: record the effective spec for the task run inside, and take
    it back when the run fails or is stopped before writing anything else. Other tasks record it
    with their results (`results_recorded`)."""
    if task not in SPEC_RECORDED_FIRST:
        yield
        return
    before = write_effective_spec(spec, task)
    try:
        yield
    except BaseException:
        undo_effective_spec(before)
        raise


@contextlib.contextmanager
def results_recorded(spec: ExperimentConfig, task: str) -> Iterator[None]:
    """Wrap a task's writing of its final results: after them (each written atomically) the effective
    spec replaces experiment.yaml, and a SIGTERM/SIGINT arriving meanwhile waits until both are written."""
    from ..runtime.signals import signals_deferred

    with signals_deferred():
        yield
        record_effective_spec(spec, task)
