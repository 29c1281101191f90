"""Signed, encrypted rekey datagrams (pure; used by the controller and the member).

One rekey message (a TEK rollover, a KEK rollover, an LKH update or a heartbeat) becomes
one or more datagrams. The same bytes are multicast on the group's rekey channel and
pushed over each member's TLS session inside ``RekeyPush``. See docs/PROTOCOL.md s6.

    datagram = msgpack [1, header_bytes, signature]
    signature = Ed25519(b"groupsec-rekey-v1" + header_bytes)
    header    = msgpack map {"group", "level", "msg_id", "kind", "time", "kek_epoch",
                             "nonce" (12 bytes), "ct", "frag": [index, count] (only when split)}
    ct        = AES-256-GCM(KEK[kek_epoch], nonce, plaintext_piece,
                            AAD = canonical msgpack of the header without "ct")
    plaintext = msgpack map {"sas": [SAGrant wire maps], "remove": [spi, ...],
                             "kek": {"epoch", "key"}, "sender_keys": {id: key},
                             "revoked_senders": [id, ...], ...}

A message too large for one datagram is split: the packed plaintext is cut into pieces,
each piece is encrypted with its own nonce and signed in its own datagram, so every
fragment is authenticated before a receiver buffers it. ``Reassembler`` joins them.
Heartbeats carry an empty plaintext and the latest msg_id (the member compares it with
the last one it holds to detect a gap; it is not a new message, so it is not "replayed").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from groupsec.errors import BadRekey, RemoteProtocolError
from groupsec.protocol.messages import SAGrant

REKEY_VERSION = 1
SIGN_CONTEXT = b"groupsec-rekey-v1"
KINDS = ("rekey", "heartbeat", "lkh")
KEK_LEN = 32
NONCE_LEN = 12
MAX_DATAGRAM = 65000
MAX_FRAGMENTS = 256
MAX_NAME = 255

__all__ = [
    "KINDS",
    "Reassembler",
    "RekeyMessage",
    "build_heartbeat_datagrams",
    "build_rekey_datagrams",
    "open_rekey_untrusted",
]


@dataclass(frozen=True)
class RekeyMessage:
    """One verified, decrypted rekey message (or one fragment of it, when ``frag`` is set)."""

    group: str
    level: str
    msg_id: int
    kind: str
    kek_epoch: int
    time: float
    sas: tuple[SAGrant, ...] = ()
    remove: tuple[int, ...] = ()
    new_kek_epoch: int | None = None  # KEK rollover: the next KEK (never sent on eviction)
    new_kek: bytes | None = field(default=None, repr=False)
    sender_keys: dict[int, bytes] = field(default_factory=dict)
    revoked_senders: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # e.g. "lkh" for key-tree updates
    frag: tuple[int, int] | None = None  # (index, count) of a fragment not yet reassembled
    fragment: bytes = field(default=b"", repr=False)  # that fragment's plaintext piece

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.level)


# --- building ----------------------------------------------------------------------------


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _aad(header: dict[str, Any]) -> bytes:
    return _pack(sorted((k, v) for k, v in header.items() if k != "ct"))


def _seal(signing_key: Ed25519PrivateKey, header: dict[str, Any], kek: bytes, piece: bytes) -> bytes:
    header["nonce"] = os.urandom(NONCE_LEN)
    header["ct"] = AESGCM(kek).encrypt(header["nonce"], piece, _aad(header))
    header_bytes = _pack(header)
    return _pack([REKEY_VERSION, header_bytes, signing_key.sign(SIGN_CONTEXT + header_bytes)])


def build_rekey_datagrams(
    signing_key: Ed25519PrivateKey,
    kek_epoch: int,
    kek: bytes,
    group: str,
    level: str,
    msg_id: int,
    kind: str,
    inner: dict[str, Any],
    now: float,
    mtu: int = 1200,
) -> list[bytes]:
    """Seal ``inner`` (plain msgpack types, e.g. ``{"sas": [g.to_wire() ...]}``) under the KEK,
    sign it, and split it so that every datagram is at most ``mtu`` bytes."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if len(kek) != KEK_LEN:
        raise ValueError("KEK must be 32 bytes")
    if msg_id < 0 or kek_epoch < 0:
        raise ValueError("msg_id and kek_epoch must not be negative")
    plaintext = _pack(inner)
    base = {"group": group, "level": level, "msg_id": msg_id, "kind": kind, "time": float(now),
            "kek_epoch": kek_epoch}
    single = _seal(signing_key, dict(base), kek, plaintext)
    if len(single) <= mtu:
        return [single]
    # overhead of a fragment with an empty piece, plus room for bin-length headers
    overhead = len(_seal(signing_key, dict(base, frag=[MAX_FRAGMENTS, MAX_FRAGMENTS]), kek, b"")) + 16
    chunk = mtu - overhead
    if chunk < 64:
        raise ValueError(f"mtu {mtu} is too small for a rekey fragment")
    pieces = [plaintext[i : i + chunk] for i in range(0, len(plaintext), chunk)]
    if len(pieces) > MAX_FRAGMENTS:
        raise ValueError(f"rekey message needs {len(pieces)} fragments (> {MAX_FRAGMENTS})")
    return [_seal(signing_key, dict(base, frag=[i, len(pieces)]), kek, p) for i, p in enumerate(pieces)]


def build_heartbeat_datagrams(signing_key: Ed25519PrivateKey, kek_epoch: int, kek: bytes, group: str,
                              level: str, latest_msg_id: int, now: float) -> list[bytes]:
    return build_rekey_datagrams(signing_key, kek_epoch, kek, group, level, latest_msg_id, "heartbeat", {}, now)


# --- opening -----------------------------------------------------------------------------


def _fmt(msg: str) -> BadRekey:
    return BadRekey(msg, "bad-format")


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                               ext_hook=_no_ext, max_bin_len=MAX_DATAGRAM * MAX_FRAGMENTS,
                               max_str_len=MAX_DATAGRAM, max_array_len=4096, max_map_len=4096)
    except BadRekey:
        raise
    except Exception as exc:
        raise _fmt(f"undecodable msgpack: {type(exc).__name__}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise _fmt(f"msgpack extension type {code} is not allowed")


def _get(d: dict[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    v = d.get(name)
    if not isinstance(v, typ) or isinstance(v, bool):
        raise _fmt(f"header field {name!r} is missing or has the wrong type")
    return v


def open_rekey_untrusted(
    datagram: bytes,
    verify_keys: list[Ed25519PublicKey],
    keks: dict[int, bytes],
    *,
    expect_group: str | None = None,
    expect_level: str | None = None,
) -> RekeyMessage:
    """Verify the signature, decrypt, and validate one datagram. Raises only ``BadRekey``
    (reasons: bad-format, bad-version, bad-signature, wrong-group, unknown-kek, old-kek (an epoch
    older than every KEK in ``keks``: stale, no resync needed), undecryptable).
    A fragment comes back with ``frag`` set: pass it to ``Reassembler.add``."""
    if not isinstance(datagram, (bytes, bytearray, memoryview)) or len(datagram) > MAX_DATAGRAM:
        raise _fmt("datagram is too large or not bytes")
    outer = _unpack(bytes(datagram))
    if not isinstance(outer, list) or len(outer) != 3:
        raise _fmt("datagram must be a 3-element array")
    version, header_bytes, sig = outer
    if version != REKEY_VERSION or isinstance(version, bool):
        raise BadRekey(f"unsupported rekey version {version!r}"[:80], "bad-version")
    if not isinstance(header_bytes, bytes) or not isinstance(sig, bytes) or len(sig) != 64:
        raise _fmt("header and signature must be bytes (signature 64 bytes)")
    for key in verify_keys:
        try:
            key.verify(sig, SIGN_CONTEXT + header_bytes)
            break
        except InvalidSignature:
            continue
    else:
        raise BadRekey("rekey signature does not verify", "bad-signature")
    header = _unpack(header_bytes)
    if not isinstance(header, dict) or not all(isinstance(k, str) for k in header):
        raise _fmt("header must be a map with string keys")
    group = _get(header, "group", str)
    level = _get(header, "level", str)
    msg_id = _get(header, "msg_id", int)
    kind = _get(header, "kind", str)
    now = float(_get(header, "time", (int, float)))
    epoch = _get(header, "kek_epoch", int)
    nonce = _get(header, "nonce", bytes)
    ct = _get(header, "ct", bytes)
    if len(group) > MAX_NAME or len(level) > MAX_NAME or msg_id < 0 or epoch < 0 or len(nonce) != NONCE_LEN:
        raise _fmt("header field out of range")
    if kind not in KINDS:
        raise _fmt(f"unknown rekey kind {kind!r}"[:80])
    frag = header.get("frag")
    if frag is not None:
        if (not isinstance(frag, list) or len(frag) != 2 or not all(type(x) is int for x in frag)
                or not 0 <= frag[0] < frag[1] <= MAX_FRAGMENTS):
            raise _fmt("bad fragment index")
        frag = (frag[0], frag[1])
    if (expect_group is not None and group != expect_group) or (expect_level is not None and level != expect_level):
        raise BadRekey(f"rekey for {group}/{level} arrived for another group"[:200], "wrong-group")
    kek = keks.get(epoch)
    if kek is None:
        if keks and epoch < min(keks):  # older than every KEK we hold: nothing to catch up on
            raise BadRekey(f"KEK epoch {epoch} is older than ours", "old-kek")
        raise BadRekey(f"no KEK for epoch {epoch}", "unknown-kek")
    try:
        plaintext = AESGCM(kek).decrypt(nonce, ct, _aad(header))
    except (InvalidTag, ValueError):
        raise BadRekey("rekey does not decrypt under the KEK", "undecryptable") from None
    msg = RekeyMessage(group, level, msg_id, kind, epoch, now)
    if frag is not None:
        return _replace(msg, frag=frag, fragment=plaintext)
    return _with_inner(msg, plaintext)


def _replace(msg: RekeyMessage, **kw: Any) -> RekeyMessage:
    d = {k: getattr(msg, k) for k in msg.__dataclass_fields__}
    d.update(kw)
    return RekeyMessage(**d)


def _with_inner(msg: RekeyMessage, plaintext: bytes) -> RekeyMessage:
    inner = _unpack(plaintext)
    if not isinstance(inner, dict) or not all(isinstance(k, str) for k in inner):
        raise _fmt("rekey payload must be a map with string keys")
    try:
        sas = tuple(SAGrant.from_wire_untrusted(s) for s in _list(inner, "sas"))
    except RemoteProtocolError as exc:
        raise _fmt(f"bad SA in rekey: {exc}") from None
    remove = tuple(_list(inner, "remove"))
    revoked = tuple(_list(inner, "revoked_senders"))
    if not all(type(x) is int and 0 <= x <= 0xFFFFFFFF for x in remove + revoked):
        raise _fmt("remove/revoked_senders must be lists of unsigned ints")
    sk = inner.get("sender_keys") or {}
    if not isinstance(sk, dict) or not all(type(k) is int and isinstance(v, bytes) and len(v) == 32
                                           for k, v in sk.items()):
        raise _fmt("sender_keys must map int to 32-byte keys")
    new_epoch = new_kek = None
    kek = inner.get("kek")
    if kek is not None:
        if (not isinstance(kek, dict) or type(kek.get("epoch")) is not int or kek["epoch"] < 0
                or not isinstance(kek.get("key"), bytes) or len(kek["key"]) != KEK_LEN):
            raise _fmt("kek must be {epoch: int, key: 32 bytes}")
        new_epoch, new_kek = kek["epoch"], kek["key"]
    extra = {k: v for k, v in inner.items() if k not in ("sas", "remove", "revoked_senders", "sender_keys", "kek")}
    return _replace(msg, sas=sas, remove=remove, new_kek_epoch=new_epoch, new_kek=new_kek, sender_keys=dict(sk),
                    revoked_senders=revoked, extra=extra)


def _list(d: dict[str, Any], name: str) -> list[Any]:
    v = d.get(name)
    if v is None:
        return []
    if not isinstance(v, list):
        raise _fmt(f"{name!r} must be a list")
    return v


# --- reassembly --------------------------------------------------------------------------


class Reassembler:
    """Joins verified fragments into whole messages. Pure and bounded: at most
    ``max_pending`` partial messages, each dropped ``timeout`` seconds after its first piece."""

    def __init__(self, max_pending: int = 16, timeout: float = 30.0) -> None:
        self._pending: dict[tuple[str, str, int], tuple[float, RekeyMessage, dict[int, bytes]]] = {}
        self._max = max_pending
        self._timeout = timeout
        self.dropped = 0

    def add(self, msg: RekeyMessage, now: float) -> RekeyMessage | None:
        """Return the whole message when ``msg`` completes it (or is not a fragment), else None."""
        if msg.frag is None:
            return msg
        self.expire(now)
        key = (msg.group, msg.level, msg.msg_id)
        index, count = msg.frag
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= self._max:
                oldest = min(self._pending, key=lambda k: self._pending[k][0])
                del self._pending[oldest]
                self.dropped += 1
            entry = (now, msg, {})
            self._pending[key] = entry
        _first, head, pieces = entry
        if head.frag is None or head.frag[1] != count or head.kek_epoch != msg.kek_epoch or head.kind != msg.kind:
            raise BadRekey("fragments of one message disagree", "bad-format")
        pieces[index] = msg.fragment
        if len(pieces) < count:
            return None
        del self._pending[key]
        whole = b"".join(pieces[i] for i in range(count))
        return _with_inner(_replace(head, frag=None, fragment=b""), whole)

    def feed_untrusted(self, datagram: bytes, verify_keys: list[Ed25519PublicKey], keks: dict[int, bytes],
                       now: float) -> RekeyMessage | None:
        return self.add(open_rekey_untrusted(datagram, verify_keys, keks), now)

    def expire(self, now: float) -> None:
        for key in [k for k, (t, _, _) in self._pending.items() if now - t > self._timeout]:
            del self._pending[key]
            self.dropped += 1

    @property
    def pending(self) -> int:
        return len(self._pending)
