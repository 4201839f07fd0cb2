"""The node-local cache of S3 objects that datasets, checkpoints and weights are read from.

One entry per (bucket, key, ETag): a changed object is another entry. An entry is written to a
temporary name and renamed, under a file lock, so every process on the node (all ranks, their
loader workers, the next attempt, evaluate and inference) shares one download per object. Its
content MD5 sits beside it (`<entry>.md5`, renamed in first): a cached file whose size or MD5 is
wrong is dropped and fetched again. Past `DDETR_CACHE_SIZE` bytes the least recently used entries
go (use refreshes an entry's mtime): the cache keeps to nine tenths of it, the last tenth being room for
downloads under way and for other processes' downloads before they measure (an emptyDir's sizeLimit
evicts the pod when passed).

Settings (environment, set by the operator from the job's spec.cache; docs/architecture.md):
`DDETR_CACHE_DIR` (default: ~/.cache/deformable_detr/objects) and `DDETR_CACHE_SIZE` (bytes, or
with a Ki/Mi/Gi/Ti or K/M/G/T suffix; default 50Gi). S3 endpoint, region, credentials and retries
are storage.py's (S3_ENDPOINT_URL, AWS_*): boto3's standard retry mode backs off on throttling,
5xx and connection errors; what outlasts it ends with storage's retryable exit code.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from . import storage
from .logging import get_logger
from .storage import ArtifactNotFound, StorageError, StorageUnavailable

log = get_logger("object_cache")

CACHE_DIR_ENV = "DDETR_CACHE_DIR"
CACHE_SIZE_ENV = "DDETR_CACHE_SIZE"
DEFAULT_CACHE_SIZE = "50Gi"
T = TypeVar("T")
DOWNLOAD_ATTEMPTS = 3  # whole downloads; each request also has botocore's retries (AWS_MAX_ATTEMPTS)
STALE_TMP_S = 3600  # a partial download untouched this long belongs to a process that died
CHUNK = 1024 * 1024  # bytes read from a GET's body at a time: what one download holds in memory
_UNITS = {"": 1, "k": 1000, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4, "P": 1000 ** 5,
          "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3, "Ti": 1024 ** 4, "Pi": 1024 ** 5}
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")  # a single-part upload's ETag (not SSE-KMS) is its MD5


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or HEAD says of an object: enough to name and check its cache entry."""

    uri: str
    etag: str
    size: int


def parse_size(text: str, field: str = CACHE_SIZE_ENV) -> int:
    """'20Gi' -> 21474836480 (a Kubernetes quantity, as spec.cache.size gives it); one line naming `field` for
    anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(k|[KMGTP]i?)?\s*", str(text))
    if not match or float(match.group(1)) * _UNITS[match.group(2) or ""] < 1:
        raise StorageError(f"{field}: {text!r} is not a size; accepted: a positive number of bytes, "
                           "optionally with a suffix k, M, G, T, P, Ki, Mi, Gi, Ti or Pi (e.g. 20Gi)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def info_of(uri: str) -> ObjectInfo:
    """HEAD `uri`: its ETag and size (one line naming the URI when it or its bucket is missing)."""
    bucket, key = storage.split_uri(uri)
    try:
        head = storage._s3_call(uri, lambda c: c.head_object(Bucket=bucket, Key=key))
    except ArtifactNotFound:
        storage._require_bucket(uri)
        raise
    return ObjectInfo(uri, head["ETag"].strip('"'), int(head["ContentLength"]))


def list_prefix(prefix: str) -> list[ObjectInfo]:
    """Every object below the folder `prefix` with its ETag and size, sorted by URI; one LIST call a 1000."""
    bucket, key = storage.split_uri(prefix)
    folder = key if not key or key.endswith("/") else key + "/"

    def _list(client) -> list[ObjectInfo]:
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            found.extend(ObjectInfo(f"{storage.S3_SCHEME}{bucket}/{item['Key']}", item["ETag"].strip('"'),
                                    int(item["Size"])) for item in page.get("Contents", []))
        return found

    return sorted(storage._s3_call(prefix, _list), key=lambda info: info.uri)


class ObjectCache:
    """Cached local copies of S3 objects below `root`, at most about `max_bytes` in all."""

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._checked: set[tuple[str, int]] = set()  # (entry, mtime_ns) verified by this process
        self._added = 0  # bytes this process wrote since it last measured the cache
        self._size_lock = threading.Lock()
        os.makedirs(root, exist_ok=True)

    def entry_path(self, info: ObjectInfo) -> str:
        bucket, key = storage.split_uri(info.uri)
        digest = hashlib.sha256(f"{bucket}\0{key}\0{info.etag}".encode()).hexdigest()
        return os.path.join(self.root, digest[:2], digest)

    def holds(self, info: ObjectInfo) -> bool:
        """Whether an entry of the right size is there (its MD5 is checked by whoever reads it)."""
        try:
            return os.stat(self.entry_path(info)).st_size == info.size
        except FileNotFoundError:
            return False

    def fetch(self, info: ObjectInfo) -> str:
        """The local path of `info`'s content: from the cache when whole and intact, else downloaded."""
        path = self.entry_path(info)
        if self._intact(path, info):
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process downloading it: wait, then use its copy
            try:
                if self._intact(path, info):
                    return path
                self._download(info, path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._evict_if_full()
        return path

    def _intact(self, path: str, info: ObjectInfo) -> bool:
        """Whether the entry is there with the listed size and the MD5 it was stored with (checked once a
        process per version of the file); a damaged one is removed."""
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return False
        if (path, stat.st_mtime_ns) in self._checked:
            return True
        problem = ""
        if stat.st_size != info.size:
            problem = f"{stat.st_size} bytes, the object has {info.size}"
        else:
            try:
                with open(path + ".md5") as fh:
                    expected = fh.read().strip()
            except FileNotFoundError:
                expected = ""
            actual = _md5_of(path)
            if actual != expected:
                problem = f"MD5 {actual}, stored {expected or 'none'}"
        if problem:
            log.warning("cached copy of %s is damaged (%s); fetching it again", info.uri, problem)
            for name in (path, path + ".md5"):
                _remove(name)
            return False
        os.utime(path)  # recently used: the last to be evicted
        self._checked.add((path, os.stat(path).st_mtime_ns))
        return True

    def _download(self, info: ObjectInfo, path: str) -> None:
        bucket, key = storage.split_uri(info.uri)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"

        def _get(client) -> str:
            reply = client.get_object(Bucket=bucket, Key=key)
            etag = reply["ETag"].strip('"')
            if etag != info.etag:
                raise StorageError(f"{info.uri}: the object changed while the job read it (ETag {etag}, "
                                   f"listed {info.etag}); do not rewrite a dataset a job is reading")
            digest = hashlib.md5()
            size = 0
            with open(tmp, "wb") as out:
                for chunk in reply["Body"].iter_chunks(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if size != info.size:
                raise StorageUnavailable(f"{info.uri}: got {size} bytes, the object has {info.size}")
            md5 = digest.hexdigest()
            if _MD5_ETAG.match(etag) and reply.get("ServerSideEncryption") != "aws:kms" and md5 != etag:
                raise StorageUnavailable(f"{info.uri}: the bytes received have MD5 {md5}, the object's ETag is "
                                         f"{etag}")
            return md5

        try:
            md5 = _with_retries(lambda: storage._s3_call(info.uri, _get))
            with open(tmp + ".md5", "w") as fh:
                fh.write(md5)
            os.replace(tmp + ".md5", path + ".md5")
            os.replace(tmp, path)
        except ArtifactNotFound:
            storage._require_bucket(info.uri)
            raise
        finally:
            for name in (tmp, tmp + ".md5"):
                _remove(name)
        self._checked.add((path, os.stat(path).st_mtime_ns))
        with self._size_lock:
            self._added += info.size

    def _evict_if_full(self) -> None:
        """Remove the least recently used entries once this process's downloads may have filled the cache."""
        with self._size_lock:
            if self._added < self.max_bytes // 40:
                return  # measuring walks the cache: done after every 40th of the bound written
            self._added = 0
        with open(os.path.join(self.root, ".evict.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = []
            for folder, _dirs, names in os.walk(self.root):
                for name in names:
                    path = os.path.join(folder, name)
                    try:
                        stat = os.stat(path)
                    except FileNotFoundError:  # removed by a reader that found it damaged
                        continue
                    if "." not in name:  # data files; their .md5 and .lock go with them
                        entries.append((stat.st_mtime, stat.st_size, path))
                    elif name.endswith(".tmp") and stat.st_mtime < time.time() - STALE_TMP_S:
                        _remove(path)  # left by a process killed mid-download
            total = sum(size for _t, size, _p in entries)
            for _mtime, size, path in sorted(entries):
                if total <= self.max_bytes * 9 // 10:
                    break
                for name in (path, path + ".md5", path + ".lock"):
                    _remove(name)
                total -= size
            fcntl.flock(lock, fcntl.LOCK_UN)


def _with_retries(action: Callable[[], T], attempts: int = DOWNLOAD_ATTEMPTS) -> T:
    """botocore retries a request; this retries a whole download whose body broke off or came back
    wrong, with exponential backoff and jitter."""
    for attempt in range(attempts - 1):
        try:
            return action()
        except StorageUnavailable as err:
            pause = random.uniform(0, 0.5 * 2 ** attempt)
            log.warning("%s; trying again in %.1f s", err, pause)
            time.sleep(pause)
    return action()


def _md5_of(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


_cache: Optional[ObjectCache] = None
_cache_lock = threading.Lock()


def node_cache() -> ObjectCache:
    """This process's view of the node's cache, from DDETR_CACHE_DIR and DDETR_CACHE_SIZE."""
    global _cache
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "deformable_detr",
                                                         "objects")
    size = parse_size(os.environ.get(CACHE_SIZE_ENV) or DEFAULT_CACHE_SIZE)
    with _cache_lock:
        if _cache is None or (_cache.root, _cache.max_bytes) != (root, size):
            try:
                _cache = ObjectCache(root, size)
            except OSError as err:
                raise StorageError(f"{CACHE_DIR_ENV}: cannot use {root} as the object cache "
                                   f"({err.strerror or err}); give a writable folder") from None
        return _cache
