"""Key wrapping for the LKH key tree (pure).

A node key is wrapped with AES key wrap (RFC 3394, ``cryptography``'s ``aes_key_wrap``)
under a *wrap key* derived from the wrapping node's key and the wrap's labels::

    kw_key  = HKDF-Expand-SHA256(wrapping_node_key,
                                 "groupsec lkh wrap v1" || target_id || target_version
                                                        || wrapping_id || wrapping_version, 32)
    wrapped = AES-KW(kw_key, target_key)            # 32-byte key -> 40 bytes

Why AES-KW and not an AEAD: a rekey carries ~d*log_d(N) wraps, so every byte per wrap counts.
AES-KW adds 8 bytes to a 32-byte key (40 in total) and needs no nonce; AES-GCM would need a
12-byte nonce and a 16-byte tag (60 bytes), 50% more on the wire. AES-KW's 64-bit integrity
check is enough here: wrapped keys are random, so nothing can be forged into a useful key, and
the whole rekey message is signed by the controller anyway.

Why the HKDF step: it binds every wrap to its labels (the role "associated data" plays in an
AEAD) at zero byte cost, so a wrap moved to another target, node or version does not open,
and it keeps node keys for one purpose only: a node key is never itself an AES-KW key, and
the root key (the group KEK) can be used directly by the rekey layer without key reuse across
algorithms. HKDF-Expand alone is correct here because node keys are uniformly random 32-byte
strings (RFC 5869 s3.3).
"""

from __future__ import annotations

import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from groupsec.errors import BadRekey

KEY_LEN = 32
WRAPPED_LEN = 40
MAX_LABEL = 2**64 - 1

_LABEL = b"groupsec lkh wrap v1"
_IDS = struct.Struct(">QQQQ")

__all__ = ["KEY_LEN", "WRAPPED_LEN", "new_key", "unwrap_key", "wrap_key"]


def new_key() -> bytes:
    """A fresh node key (os.urandom)."""
    return os.urandom(KEY_LEN)


def _kw_key(node_key: bytes, target_id: int, target_version: int, wrapping_id: int, wrapping_version: int) -> bytes:
    if len(node_key) != KEY_LEN:
        raise ValueError("node keys are 32 bytes")
    info = _LABEL + _IDS.pack(target_id, target_version, wrapping_id, wrapping_version)
    return HKDFExpand(hashes.SHA256(), KEY_LEN, info).derive(node_key)


def wrap_key(wrapping_key: bytes, key: bytes, target_id: int, target_version: int,
             wrapping_id: int, wrapping_version: int) -> bytes:
    """Wrap ``key`` (the new key of node ``target_id`` at ``target_version``) under
    ``wrapping_key`` (the key of node ``wrapping_id`` at ``wrapping_version``). 40 bytes."""
    if len(key) != KEY_LEN:
        raise ValueError("node keys are 32 bytes")
    kw = _kw_key(wrapping_key, target_id, target_version, wrapping_id, wrapping_version)
    return aes_key_wrap(kw, key)


def unwrap_key(wrapping_key: bytes, wrapped: bytes, target_id: int, target_version: int,
               wrapping_id: int, wrapping_version: int) -> bytes:
    """Open a wrap made by :func:`wrap_key`. Raises ``BadRekey`` (reason ``unwrap-failed``)
    when the key or any label is wrong; never anything else for bad input."""
    if len(wrapped) != WRAPPED_LEN or len(wrapping_key) != KEY_LEN:
        raise BadRekey("wrapped key or wrapping key has the wrong length", "unwrap-failed")
    if not all(0 <= x <= MAX_LABEL for x in (target_id, target_version, wrapping_id, wrapping_version)):
        raise BadRekey("wrap label out of range", "unwrap-failed")
    kw = _kw_key(wrapping_key, target_id, target_version, wrapping_id, wrapping_version)
    try:
        return aes_key_unwrap(kw, bytes(wrapped))
    except (InvalidUnwrap, ValueError):
        raise BadRekey("wrapped key does not open", "unwrap-failed") from None
