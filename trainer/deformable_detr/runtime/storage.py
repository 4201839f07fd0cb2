"""Reading and writing artifacts by path, local or `s3://bucket/key`, and the one S3 client cache.

Failures end in one `StorageError` line whose exit code says whether waiting may help (201) or
not (2); writes never leave a half-written artifact. Settings and rules: docs/architecture.md.
"""
from __future__ import annotations

import io
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from .. import exit_codes
from ..errors import UsageError
from .files import atomic_path
from .logging import get_logger
from .progress import TransferProgress

T = TypeVar("T")
log = get_logger("storage")

S3_SCHEME = "s3://"
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest allowed multipart part (except the last)
DEFAULT_PART_SIZE = 64 * 1024 * 1024  # 10,000 parts of this cover objects up to ~640 GB
DEFAULT_MAX_ATTEMPTS = 5

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                     "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId", "403", "401"}
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
# Answers that say "try again later" whatever their HTTP status.
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "RequestTimeout", "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError", "429", "503"}

EXIT_STORAGE_UNAVAILABLE = exit_codes.STORAGE_UNAVAILABLE.code


class StorageError(UsageError):
    """An artifact could not be read or written (credentials, bucket, endpoint, missing object).

    `retryable` is True for failures that may pass on their own (endpoint unreachable, server errors).
    """

    def __init__(self, message: str, retryable: bool = False):
        if "Traceback" in message:  # re-raised from a DataLoader worker, with the worker's traceback: its last line
            message = [line for line in message.splitlines() if line.strip()][-1].split(": ", 1)[-1]
        super().__init__(" ".join(message.split()))  # server messages may carry newlines; the CLI shows one line
        self.retryable = retryable
        self.exit_code = EXIT_STORAGE_UNAVAILABLE if retryable else UsageError.exit_code


class StorageUnavailable(StorageError):
    """A failure that may pass on its own; retryable even when re-created from its message alone (as torch
    re-raises a DataLoader worker's exception)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message, retryable)


def storage_error(message: str, retryable: bool) -> StorageError:
    return StorageUnavailable(message) if retryable else StorageError(message)


class ArtifactNotFound(StorageError):
    """The file or S3 object does not exist (its bucket does)."""


def is_remote(path: str) -> bool:
    return "://" in path


def is_s3(path: str) -> bool:
    return path.startswith(S3_SCHEME)


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for URIs and os.path.join for local paths."""
    if is_remote(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def _check_scheme(path: str) -> None:
    if is_remote(path) and not is_s3(path):
        scheme = path.split("://", 1)[0]
        raise StorageError(f"{path}: unsupported storage scheme '{scheme}://'; "
                           "accepted: a local path or s3://bucket/key")


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`); StorageError when there is no bucket."""
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the S3 URI; accepted: s3://bucket/key")
    return bucket, key


# ---------------------------------------------------------------- S3 client and errors

_clients: "OrderedDict[tuple, object]" = OrderedDict()
_client_lock = threading.Lock()
_known_buckets: set[tuple[str, str]] = set()
MAX_CLIENTS = 64  # the least recently used beyond this are dropped (the operator meets one per job's Secret)
# What boto3's credential chain reads from the environment: a client made under other values is another client.
_CHAIN_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")


@dataclass(frozen=True)
class S3Access:
    """Where and as whom to reach S3, and how patiently; None takes boto3's usual chain (env, profile, role)."""

    endpoint: Optional[str] = None
    region: Optional[str] = None
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    connect_timeout: float = 10
    read_timeout: float = 120
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_mode: str = "standard"


def endpoint_url() -> Optional[str]:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def _max_attempts() -> int:
    raw = os.environ.get("AWS_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise StorageError(f"AWS_MAX_ATTEMPTS: {raw!r} is not a positive integer; accepted: 1, 2, ...")
    return value


def client_for(access: S3Access):
    """A boto3 S3 client for `access`, cached: making one loads the service model (tens of ms of CPU).

    Clients are thread-safe to call; making them is not (boto3's default session), hence a session
    each and the lock. One per process: a forked child makes its own.
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    cache_key = (access, os.getpid()) + tuple(os.environ.get(name) for name in _CHAIN_ENV)
    with _client_lock:
        client = _clients.get(cache_key)
        if client is not None:
            _clients.move_to_end(cache_key)
            return client
        config = Config(retries={"max_attempts": access.max_attempts, "mode": access.retry_mode},
                        connect_timeout=access.connect_timeout, read_timeout=access.read_timeout)
        try:
            client = boto3.session.Session().client(
                "s3", endpoint_url=access.endpoint, region_name=access.region, config=config,
                aws_access_key_id=access.access_key_id, aws_secret_access_key=access.secret_access_key)
        except BotoCoreError as err:  # e.g. AWS_PROFILE names no profile, a malformed endpoint URL
            raise StorageError(f"S3 client: {err}; check AWS_PROFILE, S3_ENDPOINT_URL/AWS_ENDPOINT_URL "
                               "and AWS_REGION") from None
        _clients[cache_key] = client
        while len(_clients) > MAX_CLIENTS:
            _clients.popitem(last=False)
        return client


def s3_client():
    """The S3 client of this process's environment: S3_ENDPOINT_URL/AWS_ENDPOINT_URL, AWS_REGION, AWS_MAX_ATTEMPTS."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return client_for(S3Access(endpoint=endpoint_url(), region=region, max_attempts=_max_attempts(),
                               retry_mode=os.environ.get("AWS_RETRY_MODE", "standard")))


def _where(client) -> str:
    return client.meta.endpoint_url


def _client_error_in(err: BaseException):
    """The botocore ClientError behind `err` (boto3's transfer manager wraps them), if any."""
    from botocore.exceptions import ClientError

    while err is not None:
        if isinstance(err, ClientError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _translate(err: BaseException, uri: str, client) -> StorageError:
    """One clear line for a failed S3 call."""
    from botocore.exceptions import (BotoCoreError, ConnectionError as BotoConnectionError, NoCredentialsError,
                                     PartialCredentialsError)

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"{uri}: no usable AWS credentials ({err}); set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the pod an IAM role")
    client_error = _client_error_in(err)
    if client_error is not None:
        info = client_error.response.get("Error", {})
        code = str(info.get("Code", ""))
        message = info.get("Message", "")
        bucket = split_uri(uri)[0]
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: bucket '{bucket}' does not exist at {_where(client)}; "
                                "create it or fix the URI")
        if code in _CREDENTIAL_CODES:
            return StorageError(f"{uri}: S3 at {_where(client)} rejected the credentials ({code}: {message}); "
                                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE and the bucket policy")
        if code in _NOT_FOUND_CODES:
            return ArtifactNotFound(f"file not found: {uri}")
        status = int(client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return storage_error(f"{uri}: S3 request failed ({code}: {message})",
                             retryable=status >= 500 or status == 429 or code in _THROTTLE_CODES)
    if isinstance(err, BotoConnectionError):
        return StorageUnavailable(f"{uri}: cannot reach the S3 endpoint {_where(client)} after {_max_attempts()} "
                                  f"attempts ({type(err).__name__}); check S3_ENDPOINT_URL/AWS_ENDPOINT_URL and the "
                                  "network")
    if isinstance(err, BotoCoreError):
        return StorageUnavailable(f"{uri}: S3 request failed: {err}")
    return StorageUnavailable(f"{uri}: S3 transfer failed: {type(err).__name__}: {err}")


def _s3_call(uri: str, action: Callable[[object], T]) -> T:
    """Run `action(client)`, turning botocore/boto3 failures into one StorageError line."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client()
    try:
        return action(client)
    except (BotoCoreError, ClientError, Boto3Error) as err:
        raise _translate(err, uri, client) from None


def _require_bucket(uri: str) -> None:
    """After a 404: say 'bucket does not exist' when it was the bucket, not the key, that is missing."""
    bucket, _ = split_uri(uri)
    marker = (endpoint_url() or "", bucket)
    if marker in _known_buckets:
        return
    try:
        _s3_call(uri, lambda c: c.head_bucket(Bucket=bucket))
    except ArtifactNotFound:
        raise StorageError(f"{uri}: bucket '{bucket}' does not exist at {_where(s3_client())}; "
                           "create it or fix the URI") from None
    _known_buckets.add(marker)


def _transfer_config(part_size: Optional[int] = None):
    from boto3.s3.transfer import TransferConfig

    size = part_size or DEFAULT_PART_SIZE
    if size < MIN_PART_SIZE:
        raise StorageError(f"part size {size} is below S3's minimum of {MIN_PART_SIZE} bytes")
    return TransferConfig(multipart_threshold=size, multipart_chunksize=size, max_concurrency=4)


# ---------------------------------------------------------------- public API


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to a local path (atomically) or an S3 object."""
    _check_scheme(path)
    if is_s3(path):
        bucket, key = split_uri(path)
        _s3_call(path, lambda c: c.upload_fileobj(io.BytesIO(data), bucket, key, Config=_transfer_config()))
        return
    with atomic_path(path, size=len(data)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path: str) -> bytes:
    _check_scheme(path)
    if is_s3(path):
        bucket, key = split_uri(path)
        buffer = io.BytesIO()
        try:
            _s3_call(path, lambda c: c.download_fileobj(bucket, key, buffer, Config=_transfer_config()))
        except ArtifactNotFound:
            _require_bucket(path)
            raise
        return buffer.getvalue()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except (FileNotFoundError, IsADirectoryError):
        raise ArtifactNotFound(f"file not found: {path}") from None


def exists(path: str) -> bool:
    """True when the file or S3 object exists; a missing bucket is an error, not False."""
    _check_scheme(path)
    if not is_s3(path):
        return os.path.exists(path)
    bucket, key = split_uri(path)
    try:
        _s3_call(path, lambda c: c.head_object(Bucket=bucket, Key=key))
    except ArtifactNotFound:
        _require_bucket(path)
        return False
    return True


def delete(path: str) -> None:
    """Remove the file or S3 object; one that is not there counts as removed."""
    _check_scheme(path)
    if not is_s3(path):
        if os.path.isfile(path):
            os.remove(path)
        return
    bucket, key = split_uri(path)
    _s3_call(path, lambda c: c.delete_object(Bucket=bucket, Key=key))


def _is_partial_local(name: str) -> bool:
    # Temporary files of `atomic_path` (".<name>.<random>.tmp") are writes still in progress.
    return name.startswith(".") and name.endswith(".tmp")


def list_files(prefix: str) -> list[str]:
    """Every complete file below the folder `prefix` (recursively), as full paths or s3:// URIs, sorted.

    A folder or S3 prefix that does not exist yet lists as empty; a missing bucket is an error.
    """
    _check_scheme(prefix)
    if not is_s3(prefix):
        found = []
        for root, _dirs, names in os.walk(prefix):
            found.extend(os.path.join(root, name) for name in names if not _is_partial_local(name))
        return sorted(found)
    bucket, key = split_uri(prefix)
    folder = key if not key or key.endswith("/") else key + "/"

    def _list(client) -> list[str]:
        uris = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            uris.extend(f"{S3_SCHEME}{bucket}/{item['Key']}" for item in page.get("Contents", []))
        return uris

    return sorted(_s3_call(prefix, _list))


def _copy_local(source: str, destination: str) -> None:
    if os.path.abspath(source) == os.path.abspath(destination):
        return
    with atomic_path(destination, size=os.path.getsize(source)) as tmp:
        shutil.copyfile(source, tmp)


def download(uri: str, local_path: str) -> str:
    """Copy `uri` (S3 or local) to `local_path` atomically; returns `local_path`."""
    _check_scheme(uri)
    if not is_s3(uri):
        if not os.path.isfile(uri):
            raise ArtifactNotFound(f"file not found: {uri}")
        _copy_local(uri, local_path)
        return local_path
    bucket, key = split_uri(uri)
    shown = TransferProgress(f"downloading {uri}", log)
    with atomic_path(local_path) as tmp:
        try:
            _s3_call(uri, lambda c: c.download_file(bucket, key, tmp, Config=_transfer_config(), Callback=shown))
        except ArtifactNotFound:
            _require_bucket(uri)
            raise
    shown.finish()
    return local_path


def upload_file(local_path: str, uri: str, part_size: Optional[int] = None) -> None:
    """Copy a local file to `uri`; multipart above `part_size` bytes (default 64 MiB), parts in parallel.

    The object appears only when the whole upload has completed; a failed multipart upload is aborted.
    """
    if not os.path.isfile(local_path):
        raise ArtifactNotFound(f"file not found: {local_path}")
    _check_scheme(uri)
    if not is_s3(uri):
        _copy_local(local_path, uri)
        return
    bucket, key = split_uri(uri)
    config = _transfer_config(part_size)
    shown = TransferProgress(f"uploading {uri}", log, os.path.getsize(local_path))
    _s3_call(uri, lambda c: c.upload_file(local_path, bucket, key, Config=config, Callback=shown))
    shown.finish()


def copy(source_uri: str, destination_uri: str) -> None:
    """Server-side copy of one S3 object to another (or a local copy); atomic for readers."""
    _check_scheme(source_uri)
    _check_scheme(destination_uri)
    if is_s3(source_uri) != is_s3(destination_uri):
        raise StorageError(f"copy {source_uri} -> {destination_uri}: both must be local or both s3://")
    if not is_s3(source_uri):
        _copy_local(source_uri, destination_uri)
        return
    src_bucket, src_key = split_uri(source_uri)
    dst_bucket, dst_key = split_uri(destination_uri)
    # The managed copy switches to multipart copy above the threshold (single CopyObject stops at 5 GB).
    _s3_call(destination_uri, lambda c: c.copy({"Bucket": src_bucket, "Key": src_key}, dst_bucket, dst_key,
                                               Config=_transfer_config()))

