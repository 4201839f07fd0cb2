"""Dataset paths that may be `s3://bucket/key` URIs: whether they exist, what a folder holds, and a local
copy to read (from the node's object cache, runtime/object_cache.py). Local paths pass through untouched.

A folder URI is listed once a process (one LIST call a 1000 objects, which also gives each object's
ETag and size); its files are then checked and fetched without a HEAD each. Processes forked later
(loader workers) inherit the listings.
"""
from __future__ import annotations

import fnmatch
import glob as local_glob
import os
import threading

from ..runtime import storage
from ..runtime.object_cache import ObjectInfo, info_of, list_prefix, node_cache
from ..runtime.storage import ArtifactNotFound

is_s3 = storage.is_s3

_listed: dict[str, dict[str, ObjectInfo]] = {}  # folder URI (no trailing '/') -> {object URI: info}
_known: dict[str, ObjectInfo] = {}  # object URI -> info, from any listing or HEAD
_lock = threading.Lock()


def _folder(uri: str) -> str:
    return uri.rstrip("/")


def listing(folder: str) -> dict[str, ObjectInfo]:
    """The objects below the folder URI `folder` (recursively), listed once a process."""
    folder = _folder(folder)
    with _lock:
        found = _listed.get(folder)
    if found is None:
        found = {info.uri: info for info in list_prefix(folder + "/")}
        with _lock:
            _listed[folder] = found
            _known.update(found)
    return found


def info(uri: str) -> ObjectInfo:
    """ETag and size of the object `uri`: from a listing when one holds it, else one HEAD (remembered)."""
    with _lock:
        known = _known.get(uri)
    if known is None:
        known = info_of(uri)
        with _lock:
            _known[uri] = known
    return known


def is_dir(path: str) -> bool:
    """A local folder, or an S3 prefix holding at least one object."""
    return bool(listing(path)) if is_s3(path) else os.path.isdir(path)


def is_file(path: str) -> bool:
    """A local file, or an S3 object (looked up in its folder's listing when that folder was listed)."""
    if not is_s3(path):
        return os.path.isfile(path)
    with _lock:
        if path in _known:
            return True
        if any(path.startswith(folder + "/") for folder in _listed):
            return False
    try:
        info(path)
    except ArtifactNotFound:
        return False
    return True


def files_in(folder: str) -> list[str]:
    """Names of the files directly in `folder` (local: the folder's own order; S3: key order)."""
    if not is_s3(folder):
        return os.listdir(folder)
    prefix = _folder(folder) + "/"
    return [uri[len(prefix):] for uri in listing(folder) if "/" not in uri[len(prefix):]]


def glob(pattern: str) -> list[str]:
    """Files matching a shell pattern, sorted; on S3 the folder above the first wildcard is listed."""
    if not is_s3(pattern):
        return sorted(local_glob.glob(pattern))
    wildcard = min(pattern.find(ch) for ch in "*?[" if ch in pattern)
    folder = pattern[:wildcard].rsplit("/", 1)[0]
    return sorted(uri for uri in listing(folder) if fnmatch.fnmatchcase(uri, pattern))


def local_copy(path: str) -> str:
    """A local file holding `path`'s content: the path itself, or the cached copy of the S3 object."""
    if not is_s3(path):
        return path
    return node_cache().fetch(info(path))


def open_file(path: str, mode: str = "rb", **kwargs):
    """open() for a local path or an S3 object (read from its cached copy); a missing one raises
    FileNotFoundError (local) or ArtifactNotFound (S3: 'file not found: s3://...')."""
    return open(local_copy(path), mode, **kwargs)
