"""Secrets at rest for replicated stores: every value the controller writes to etcd is sealed
(AES-256-GCM) under a key-encryption key that only the controllers hold.

    sealer = load_store_key(path)           # --store-key FILE (0600, 32 random bytes or 64 hex)
    blob = sealer.seal("level/video/", plaintext)
    plaintext = sealer.open_untrusted("level/video/", blob)

The whole value is sealed (not just the TEK/KEK/LKH fields), so an etcd dump shows key names
only: which groups and members exist, never a key. The store key name is the AAD, so a value
moved to another key does not open. Blob format (version 1):

    b"GS1" | key id (8 bytes) | nonce (12 bytes) | AES-256-GCM ciphertext+tag

``KeyProvider`` is the interface a KMS-backed provider would implement later (wrap/unwrap a
data key remotely); ``FileKeyProvider`` holds the key in memory, with older keys for rotation
(``--store-key NEW --store-key OLD``: new values are sealed under the first, all open).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from groupsec.errors import ConfigError, GroupSecError

MAGIC = b"GS1"
ID_LEN, NONCE_LEN, TAG_LEN = 8, 12, 16
HEADER = len(MAGIC) + ID_LEN + NONCE_LEN


class SealError(GroupSecError):
    """A sealed value did not open: wrong or unknown store key, or tampered data."""

    def __init__(self, message: str, reason: str = "unsealable") -> None:
        super().__init__(message)
        self.reason = reason


class KeyProvider(Protocol):
    def seal(self, name: str, plaintext: bytes) -> bytes: ...

    def open_untrusted(self, name: str, blob: bytes) -> bytes: ...


def key_id(key: bytes) -> bytes:
    """A public identifier of a store key (never the key): HMAC(key, label)."""
    return hmac.new(key, b"groupsec-store-key-id", hashlib.sha256).digest()[:ID_LEN]


class FileKeyProvider:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys or any(len(k) != 32 for k in keys):
            raise ValueError("store keys are 32 bytes")
        self._current = keys[0]
        self._id = key_id(keys[0])
        self._by_id = {key_id(k): AESGCM(k) for k in keys}
        self._aead = self._by_id[self._id]
        self.sealed = 0
        self.opened = 0

    def __repr__(self) -> str:
        return f"FileKeyProvider(id={self._id.hex()}, keys={len(self._by_id)})"

    @property
    def key_id(self) -> str:
        return self._id.hex()

    def seal(self, name: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)  # random 96-bit nonces: far below 2^32 values per key
        self.sealed += 1
        return MAGIC + self._id + nonce + self._aead.encrypt(nonce, plaintext, _aad(name))

    def open_untrusted(self, name: str, blob: bytes) -> bytes:
        if len(blob) < HEADER + TAG_LEN or blob[:3] != MAGIC:
            raise SealError(f"{name}: not a sealed value", "bad-format")
        aead = self._by_id.get(bytes(blob[3:3 + ID_LEN]))
        if aead is None:
            raise SealError(f"{name}: sealed under an unknown store key {blob[3:3 + ID_LEN].hex()}", "unknown-key")
        try:
            out = aead.decrypt(bytes(blob[3 + ID_LEN:HEADER]), bytes(blob[HEADER:]), _aad(name))
        except InvalidTag:
            raise SealError(f"{name}: does not open (tampered, or moved from another key)", "bad-tag") from None
        self.opened += 1
        return out


def _aad(name: str) -> bytes:
    return b"groupsec-store-v1\0" + name.encode()


def generate_store_key(path: str | os.PathLike[str]) -> None:
    """Write a fresh 32-byte store key (mode 0600); refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: store key unreadable: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{p}: store key mode is {stat.S_IMODE(st.st_mode):04o}; allowed: 0600 or 0400")
    text = data.strip()
    if len(data) == 32:
        return data
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except (UnicodeDecodeError, ValueError):
            pass
    raise ConfigError(f"{p}: a store key is 32 random bytes or 64 hex digits "
                      f"(make one: head -c 32 /dev/urandom > {p.name}; chmod 600 {p.name})")


def load_store_key(*paths: str | os.PathLike[str]) -> FileKeyProvider:
    if not paths:
        raise ConfigError("--store-key: a key file is required with an etcd store")
    return FileKeyProvider([read_key_file(p) for p in paths])
