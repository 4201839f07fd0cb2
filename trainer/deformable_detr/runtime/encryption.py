"""Authenticated encryption of checkpoints (`-k` / `encryption_key`).

AES-256-GCM with a key derived from the passphrase by scrypt over a random per-file salt.
The data is sealed in 16 MiB chunks (one GCM call is limited to 2 GiB, and checkpoints
with optimizer state can be larger). Each chunk's nonce is its index plus a "last chunk"
flag, which is safe because every file has its own salt and so its own key; it also
means a reordered, dropped or truncated chunk fails authentication.
Layout: MAGIC | salt (16) | key check (16) | chunk 0 | chunk 1 | ... (chunk = ciphertext + 16-byte tag).
The key check (more scrypt output, never the key itself) tells a wrong key apart from a
damaged file; either way the tags fail, so a bad key can never yield garbage weights.
"""
from __future__ import annotations

import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import UsageError

MAGIC = b"DDETR-ENC-2\n"
_SALT = 16
_CHECK = 16
_TAG = 16
CHUNK_SIZE = 16 * 1024 * 1024


class KeyMismatch(UsageError):
    """An encrypted checkpoint read without its key or with another one (not a damaged file)."""


def _derive(key: str, salt: bytes) -> tuple[bytes, bytes]:
    """(AES key, key check) from the passphrase and salt."""
    derived = Scrypt(salt=salt, length=32 + _CHECK, n=2 ** 14, r=8, p=1).derive(key.encode("utf-8"))
    return derived[:32], derived[32:]


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def is_encrypted(data: bytes) -> bool:
    return data.startswith(MAGIC)


def encrypt(data: bytes, key: str, chunk_size: int = CHUNK_SIZE) -> bytes:
    salt = os.urandom(_SALT)
    aes_key, check = _derive(key, salt)
    header = MAGIC + salt + check
    cipher = AESGCM(aes_key)
    view = memoryview(data)
    starts = range(0, max(len(data), 1), chunk_size)
    sealed = [cipher.encrypt(_nonce(i, i == len(starts) - 1), view[start:start + chunk_size], header)
              for i, start in enumerate(starts)]
    return header + b"".join(sealed)


def decrypt(data: bytes, key: str | None, name: str = "checkpoint", chunk_size: int = CHUNK_SIZE) -> bytes:
    """Plain data is returned as it is; encrypted data needs the key it was written with."""
    if not is_encrypted(data):
        return data
    if not key:
        raise KeyMismatch(f"{name} is encrypted; pass its key with -k KEY (or encryption_key in the spec)")
    header = bytes(data[:len(MAGIC) + _SALT + _CHECK])
    if len(header) < len(MAGIC) + _SALT + _CHECK:
        raise UsageError(f"{name}: encrypted checkpoint is truncated (incomplete header); it cannot be read")
    aes_key, check = _derive(key, header[len(MAGIC):len(MAGIC) + _SALT])
    if not hmac.compare_digest(check, header[len(MAGIC) + _SALT:]):
        raise KeyMismatch(f"{name}: wrong key (-k); it does not decrypt this checkpoint")
    cipher = AESGCM(aes_key)
    view = memoryview(data)[len(header):]
    sealed_size = chunk_size + _TAG
    starts = range(0, max(len(view), 1), sealed_size)
    plain = []
    for i, start in enumerate(starts):
        try:
            plain.append(cipher.decrypt(_nonce(i, i == len(starts) - 1), view[start:start + sealed_size], header))
        except InvalidTag:
            raise UsageError(f"{name}: encrypted checkpoint is corrupt or truncated (chunk {i} fails "
                             "authentication); it cannot be read") from None
    return b"".join(plain)
