"""One writer per results folder: a lock a task run holds from before it records its spec until it ends.

The lock is a small JSON record, `.ddetr-writer.lock`, inside the folder (a local folder or an `s3://`
prefix): host, pid, pod and job (`HOSTNAME`, `DDETR_JOB_NAME`), task, since when, and a heartbeat
the holder refreshes every `heartbeat_seconds()`. A second run finds it and is refused in one line
naming the holder (exit 2). A holder that died leaves a stale lock, which the next run takes over:

- local folder: the holder also keeps an OS lock (flock) on the file for its whole run, which the
  kernel releases when the process dies (its forked children drop their copy of the descriptor), so on
  the same host a dead holder is noticed at once;
- a record of this host whose process is gone (pid not alive, or alive but started at another time:
  a restarted container reuses pids) is stale;
- a record of another pod of the same job (`DDETR_JOB_NAME`) is an earlier attempt, which the operator
  restarts only once every pod of it is gone: stale;
- otherwise (another host, an S3 prefix, a file system whose flock does not reach across hosts) a
  record whose heartbeat is older than `stale_seconds()` (`DDETR_LOCK_STALE_S`, default 120) is stale
  (the heartbeat is the holder's clock: hosts' clocks must agree to well within that limit).

On S3 the lock object is created with a conditional put (`If-None-Match: *`) and taken over or
refreshed with `If-Match` on the ETag read, so two runs cannot both win. A store that ignores
conditional writes (older MinIO or Ceph releases) makes this best-effort: the record is read back
after the put, and a run that finds another's token there is refused.

One lock per run: only rank 0 of node 0 takes it (or the CLI's own launcher, whose workers inherit
`HELD_ENV` and take none); peers of the same run are never refused.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from ..errors import UsageError
from .files import disk_full_error, is_disk_full
from .logging import get_logger
from . import storage

log = get_logger("lock")

LOCK_NAME = ".ddetr-writer.lock"
STALE_ENV = "DDETR_LOCK_STALE_S"
DEFAULT_STALE_S = 120.0
HELD_ENV = "DDETR_WRITER_LOCK_HELD"  # set while held, so workers the holder launches take no lock of their own
JOB_ENV = "DDETR_JOB_NAME"

# The lock files this process holds open under flock. A forked child (a data-loader worker, which runs
# in a process group of its own and may outlive a SIGKILLed parent by seconds) would share the flock
# through its copy of the descriptor; it closes that copy at once, so the lock ends with its holder.
_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def stale_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get(STALE_ENV, DEFAULT_STALE_S)))
    except ValueError:
        return DEFAULT_STALE_S


def heartbeat_seconds() -> float:
    return max(0.2, min(30.0, stale_seconds() / 4))


def takes_the_lock() -> bool:
    """Whether this process is the one of its run that holds the lock: rank 0 of node 0, and not a
    worker of a launcher that already holds it."""
    if os.environ.get(HELD_ENV):
        return False
    if "RANK" in os.environ:  # under torchrun
        return os.environ.get("RANK") == "0"
    return os.environ.get("NODE_RANK", "0").strip() in ("", "0")


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass
class Holder:
    host: str
    pid: int
    pod: str
    job: str
    task: str
    since: str
    heartbeat: float
    token: str
    proc_start: Optional[str] = None

    @classmethod
    def me(cls, task: str) -> "Holder":
        now = time.time()
        return cls(host=socket.gethostname(), pid=os.getpid(), pod=os.environ.get("HOSTNAME", ""),
                   job=os.environ.get(JOB_ENV, ""), task=task,
                   since=datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                   heartbeat=now, token=uuid.uuid4().hex, proc_start=_proc_start(os.getpid()))

    def encode(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> Optional["Holder"]:
        try:
            raw = json.loads(data.decode())
            return cls(**{f.name: raw.get(f.name) for f in dataclasses.fields(cls)})
        except (ValueError, TypeError, AttributeError):
            return None

    def describe(self) -> str:
        who = f"pod {self.pod}" if self.pod and self.pod != self.host else f"host {self.host}"
        if self.pod and self.pod != self.host:
            who += f" (host {self.host})"
        job = f", job {self.job}" if self.job else ""
        age = max(0, int(time.time() - float(self.heartbeat or 0)))
        return f"{self.task} run on {who}, pid {self.pid}{job}, since {self.since} (last heartbeat {age} s ago)"


def stale_reason(holder: Holder, me: Holder, flock_free_here: bool = False) -> Optional[str]:
    """Why the lock `holder` left is stale (a string), or None while its holder may still be writing."""
    if holder.host == me.host:
        if flock_free_here:
            return "its process ended (its OS lock was released)"
        if holder.pid == me.pid or not _alive(int(holder.pid)):
            return f"process {holder.pid} is gone"
        started = _proc_start(int(holder.pid))
        if holder.proc_start and started and started != holder.proc_start:
            return f"process {holder.pid} is gone (the pid now belongs to another process)"
        return None
    if holder.job and holder.job == me.job and holder.pod != me.pod:
        return f"it is an earlier attempt of job {holder.job} (pod {holder.pod})"
    age = time.time() - float(holder.heartbeat or 0)
    if age > stale_seconds():
        return f"its heartbeat is {int(age)} s old (stale after {int(stale_seconds())} s, {STALE_ENV})"
    return None


def _refusal(field: str, folder: str, holder: Optional[Holder]) -> UsageError:
    who = holder.describe() if holder is not None else "another run (its lock record is being written)"
    return UsageError(f"{field}: {folder} is being written by another {who}; wait for it to end or use "
                      f"another results folder (a lock left by a run that died is taken over once stale)")


class WriterLock:
    """Held by one run of one task for a results folder; `acquire()` refuses (UsageError) when taken."""

    def __init__(self, folder: str, task: str, field: str) -> None:
        self.folder, self.task, self.field = folder.rstrip("/") or folder, task, field
        self.remote = storage.is_remote(self.folder)
        self.path = f"{self.folder}/{LOCK_NAME}" if self.remote else os.path.join(self.folder, LOCK_NAME)
        self.me = Holder.me(task)
        self._fd: Optional[int] = None
        self._etag: Optional[str] = None
        self._created: list[str] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._env_before: Optional[str] = None

    # ------------------------------------------------------------------ local
    def _open_locked(self, blocking: bool) -> Optional[int]:
        """The lock file open with our flock on it (None when another process holds the flock)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the holder removed the file as it released: open the new one

    def _read_local(self) -> Optional[Holder]:
        for _ in range(20):  # a holder rewriting its heartbeat: read again
            try:
                with open(self.path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                return None
            holder = Holder.decode(data) if data.strip() else None
            if holder is not None:
                return holder
            time.sleep(0.05)
        return None

    def _write_local(self, fd: int) -> None:
        # No fsync: a record torn by a host crash reads as unreadable, and its flock is gone: taken over.
        data = self.me.encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(self.path, len(data)) from None
            raise

    def _acquire_local(self) -> None:
        parent = os.path.abspath(self.folder)
        while parent and not os.path.exists(parent):
            self._created.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(self.folder, exist_ok=True)
        fd = self._open_locked(blocking=False)
        if fd is None:  # a live process holds it on this host (or one sharing its flock)
            raise _refusal(self.field, self.folder, self._read_local())
        holder = self._read_local()
        if holder is not None and holder.token != self.me.token:
            why = stale_reason(holder, self.me, flock_free_here=True)
            if why is None:
                os.close(fd)
                raise _refusal(self.field, self.folder, holder)
            log.warning("taking over the lock of %s: %s", holder.describe(), why)
        try:
            self._write_local(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD_FDS.add(fd)

    # --------------------------------------------------------------------- S3
    def _s3(self, action):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        client = storage.s3_client()
        try:
            return action(client)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return None
            raise storage._translate(err, self.path, client) from None
        except (BotoCoreError, Boto3Error) as err:
            raise storage._translate(err, self.path, client) from None

    def _read_s3(self) -> tuple[Optional[Holder], Optional[str]]:
        bucket, key = storage.split_uri(self.path)
        try:
            got = self._s3(lambda c: c.get_object(Bucket=bucket, Key=key))
        except storage.ArtifactNotFound:
            return None, None
        if got is None:
            return None, None
        return Holder.decode(got["Body"].read()), got.get("ETag")

    def _put_s3(self, **condition) -> bool:
        bucket, key = storage.split_uri(self.path)
        done = self._s3(lambda c: c.put_object(Bucket=bucket, Key=key, Body=self.me.encode(), **condition))
        if done is None:
            return False
        self._etag = done.get("ETag")
        return True

    def _acquire_s3(self) -> None:
        for _ in range(5):
            if self._put_s3(IfNoneMatch="*"):
                holder, etag = self._read_s3()  # a store that ignores the condition: whose record is there?
                if holder is not None and holder.token != self.me.token:
                    raise _refusal(self.field, self.folder, holder)
                self._etag = etag or self._etag
                return
            holder, etag = self._read_s3()
            if holder is None:
                if etag is None:
                    continue  # removed in between: try to create it again
                why = "its record cannot be read"
            else:
                why = stale_reason(holder, self.me)
                if why is None:
                    raise _refusal(self.field, self.folder, holder)
            if self._put_s3(IfMatch=etag):
                log.warning("taking over the lock of %s: %s", holder.describe() if holder else self.path, why)
                return
        raise _refusal(self.field, self.folder, self._read_s3()[0])

    # ------------------------------------------------------------ heartbeat
    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_seconds()):
            try:
                self.me.heartbeat = time.time()
                if self.remote:
                    if not self._put_s3(IfMatch=self._etag):
                        log.error("the lock of %s was taken over by another run; this run keeps writing", self.folder)
                        return
                elif self._fd is not None:
                    self._write_local(self._fd)
            except Exception as err:  # a heartbeat must never end the run; a stale-looking lock is the cost
                log.warning("could not refresh the lock of %s: %s", self.folder, err)

    # ---------------------------------------------------------------- public
    def acquire(self) -> "WriterLock":
        if self.remote:
            self._acquire_s3()
        else:
            self._acquire_local()
        self._env_before = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = self.me.token
        self._thread = threading.Thread(target=self._beat, name="writer-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        if os.getpid() != self.me.pid:
            return  # a forked child's copy of this object: the lock is its parent's
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._env_before is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = self._env_before
        try:
            if self.remote:
                holder, _etag = self._read_s3()
                if holder is not None and holder.token == self.me.token:
                    storage.delete(self.path)
                return
            if self._fd is not None:
                try:
                    os.remove(self.path)  # under our flock: a waiter that opened it sees the inode gone
                except FileNotFoundError:
                    pass
                _HELD_FDS.discard(self._fd)
                os.close(self._fd)
                self._fd = None
                for folder in self._created:  # a folder the lock made and nothing else used
                    try:
                        os.rmdir(folder)
                    except OSError:
                        break
        except (OSError, UsageError) as err:  # the run's own result matters more than the lock's removal
            log.warning("could not remove the lock %s: %s", self.path, err)

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *_exc) -> None:
        self.release()


def is_lock_file(name: str) -> bool:
    return os.path.basename(name) == LOCK_NAME


__all__ = ["WriterLock", "Holder", "LOCK_NAME", "stale_reason", "takes_the_lock", "is_lock_file"]
