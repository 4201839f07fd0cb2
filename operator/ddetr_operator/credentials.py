"""The S3 keys of a job's credentials Secret, kept `ttl` seconds (a rotated Secret is seen that much
later; a Secret not there yet, or without the keys, is looked for again after SECRET_MISS_TTL)."""
from __future__ import annotations

import base64
import threading
import time
from typing import Callable, Mapping

from .api import CredentialsSecret

SECRET_TTL = 300.0  # seconds the S3 keys read from a job's Secret are reused
SECRET_MISS_TTL = 30.0  # ... and a Secret not there (yet), not readable, or without the keys


class SecretKeys:
    """(access key id, secret key) per (namespace, Secret, key names); `read` fetches a Secret's body
    ({} when it is not there or not ours to read)."""

    def __init__(self, read: Callable[[str, str], Mapping], ttl: float = SECRET_TTL):
        self.read, self.ttl = read, ttl
        self._lock = threading.Lock()
        self._kept: dict[tuple[str, str, str, str], tuple[float, str | None, str | None]] = {}

    def get(self, namespace: str, ref: CredentialsSecret) -> tuple[str | None, str | None]:
        cache_key = (namespace, ref.name, ref.access_key_id_key, ref.secret_access_key_key)
        now = time.monotonic()
        with self._lock:
            cached = self._kept.get(cache_key)
        if cached is not None and now < cached[0]:
            return cached[1], cached[2]
        data = self.read(ref.name, namespace).get("data") or {}
        decode = lambda key: base64.b64decode(data[key]).decode() if key in data else None  # noqa: E731
        key_id, secret_key = decode(ref.access_key_id_key), decode(ref.secret_access_key_key)
        ttl = self.ttl if key_id and secret_key else min(self.ttl, SECRET_MISS_TTL)
        if ttl > 0:
            with self._lock:
                self._kept[cache_key] = (now + ttl, key_id, secret_key)
                for stale in [k for k, v in self._kept.items() if v[0] <= now]:
                    del self._kept[stale]
        return key_id, secret_key
