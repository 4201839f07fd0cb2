"""Authenticated encryption of checkpoints (`-k` / `encryption_key`).

AES-256-GCM with a key derived from the passphrase by scrypt over a random salt.
Layout: MAGIC | salt (16) | nonce (12) | ciphertext+tag. A wrong key fails the tag
check, so a bad key can never yield garbage weights.
"""
from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import UsageError

MAGIC = b"DDETR-ENC-1\n"
_SALT, _NONCE = 16, 12


def _derive(key: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2 ** 14, r=8, p=1).derive(key.encode("utf-8"))


def is_encrypted(data: bytes) -> bool:
    return data.startswith(MAGIC)


def encrypt(data: bytes, key: str) -> bytes:
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    return MAGIC + salt + nonce + AESGCM(_derive(key, salt)).encrypt(nonce, data, MAGIC)


def decrypt(data: bytes, key: str | None, name: str = "checkpoint") -> bytes:
    if not is_encrypted(data):
        return data
    if not key:
        raise UsageError(f"{name} is encrypted; pass its key with -k KEY (or encryption_key in the spec)")
    body = data[len(MAGIC):]
    salt, nonce, payload = body[:_SALT], body[_SALT:_SALT + _NONCE], body[_SALT + _NONCE:]
    try:
        return AESGCM(_derive(key, salt)).decrypt(nonce, payload, MAGIC)
    except InvalidTag:
        raise UsageError(f"{name}: wrong key (-k); it does not decrypt this checkpoint") from None
