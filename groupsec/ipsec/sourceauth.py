"""Source-origin authentication of group packets: Ed25519 signatures after RFC 4359.

Every receiver of a group holds the group keys, so the group ICV only proves that *some
member* sealed a packet. Here each authorized sender also signs what it sends, with an
Ed25519 key whose public half the controller distributes to the receivers; a receiver
accepts a packet only when the sender that the SA (per-sender SAs) or the RFC 6054 sender
ID in the IV (a shared SA) names has signed it.

Composition, not modification: the signature is an integrity transform of its own around
whatever the ``SecurityAssociation`` produced (ESP with or without encryption). The wire
format (docs/SOURCE_AUTH.md has the full text)::

    signed packet = P || T
    P = the protected packet exactly as the SA sealed it (ESP: SPI .. ICV)
    T ("sign")         = SIG(64) || 0x01
    T ("sign-batched") = PATH(32*d) || SIG(64) || COUNT-1 (1) || INDEX (1) || 0x02
                         d = ceil(log2(COUNT)), COUNT in 1..256, INDEX < COUNT

    "sign":    SIG = Ed25519(sk, "groupsec source-auth v1 sign\\0" || P)
    "batched": SIG = Ed25519(sk, "groupsec source-auth v1 batch\\0" || COUNT-1 || ROOT)
               ROOT = the Merkle root over the window's leaves (Wong and Lam's tree chaining):
               leaf_i = SHA-256(0x00 || P_i); node = SHA-256(0x01 || left || right);
               positions COUNT .. 2^d-1 hold 32 zero octets. PATH lists the siblings from the
               leaf level up, so every packet verifies on its own, whatever else was lost.

This module is pure: bytes and ``now`` in, bytes out. It never imports trio or sockets.
Hashes use ``hashlib.sha256`` (the stdlib binding of the same OpenSSL that ``cryptography``
uses; it is ~40% cheaper per call, which matters on the per-packet path). Signatures use
``cryptography``'s Ed25519.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from itertools import repeat
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from groupsec.errors import (
    BadPacket,
    LocalProtocolError,
    PacketDropped,
    PolicyError,
    RemoteProtocolError,
    SourceAuthFailed,
)
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.replay import ReplayWindow

SourceAuthMode = Literal["none", "sign", "sign-batched"]
MODES: tuple[str, ...] = ("none", "sign", "sign-batched")

SIG_LEN = 64
HASH_LEN = 32
TYPE_SIGN = 0x01
TYPE_BATCH = 0x02
SIGN_TRAILER_LEN = SIG_LEN + 1
BATCH_FIXED_LEN = SIG_LEN + 3  # SIG, COUNT-1, INDEX, TYPE (PATH comes in front)
MAX_WINDOW = 256  # COUNT-1 and INDEX are one octet each
DEFAULT_MAX_PACKETS = 32
DEFAULT_MAX_DELAY = 0.020  # seconds: the latency bound of "sign-batched"
DEFAULT_MAX_WINDOWS = 128  # verified windows a receiver remembers per verifier
MIN_PROTECTED_LEN = 8  # an ESP header at least (SPI and sequence number)

SIGN_CONTEXT = b"groupsec source-auth v1 sign\x00"
BATCH_CONTEXT = b"groupsec source-auth v1 batch\x00"
KEY_PROOF_CONTEXT = b"groupsec source-auth v1 key-proof\x00"
EMPTY_NODE = bytes(HASH_LEN)

_LEAF = b"\x00"
_NODE = b"\x01"
_SPI = struct.Struct("!I")
_IV64 = struct.Struct("!Q")
_sha256 = hashlib.sha256
_INDEX_TYPE = [bytes((i, TYPE_BATCH)) for i in range(MAX_WINDOW)]  # INDEX || 0x02


# --- Merkle tree (pure helpers) ---------------------------------------------------------------


def leaf_hash(packet: bytes | memoryview) -> bytes:
    """SHA-256(0x00 || P): the leaf of one protected packet."""
    h = _sha256(_LEAF)
    h.update(packet)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(_NODE + left + right).digest()


def tree_depth(count: int) -> int:
    """d = ceil(log2(count)): the number of siblings each packet of a window carries."""
    if not 1 <= count <= MAX_WINDOW:
        raise LocalProtocolError(f"window of {count} packets is outside 1..{MAX_WINDOW}")
    return (count - 1).bit_length()


def build_tree(leaves: list[bytes]) -> list[list[bytes]]:
    """All levels of the tree, leaves first (padded with ``EMPTY_NODE`` to 2^d); the root is
    ``levels[-1][0]``."""
    depth = tree_depth(len(leaves))
    level = leaves + [EMPTY_NODE] * ((1 << depth) - len(leaves))
    levels = [level]
    for _ in range(depth):
        level = [node_hash(level[j], level[j + 1]) for j in range(0, len(level), 2)]
        levels.append(level)
    return levels


def batch_message(count: int, root: bytes) -> bytes:
    """What a window's signature signs."""
    return BATCH_CONTEXT + bytes((count - 1,)) + root


# --- trailer codec -----------------------------------------------------------------------------


def sign_packet(key: Ed25519PrivateKey, packet: bytes) -> bytes:
    """Mode "sign": P || SIG || 0x01."""
    return packet + key.sign(SIGN_CONTEXT + packet) + b"\x01"


def parse_trailer_untrusted(data: bytes | memoryview, mode: str) -> tuple[memoryview, Any]:
    """Split a signed packet into (P, fields). Raises only ``BadPacket``.

    "sign": fields = SIG (bytes). "sign-batched": fields = (count, index, path, sig).
    """
    mv = data if isinstance(data, memoryview) else memoryview(data)
    n = len(mv)
    if n < 1:
        raise BadPacket("empty packet: no source-auth trailer")
    kind = mv[n - 1]
    if mode == "sign":
        if kind != TYPE_SIGN:
            raise BadPacket(f"source-auth trailer type {kind} is not 1 (sign)")
        if n < SIGN_TRAILER_LEN + MIN_PROTECTED_LEN:
            raise BadPacket("packet too short for a signature trailer")
        end = n - SIGN_TRAILER_LEN
        return mv[:end], bytes(mv[end:n - 1])
    if mode == "sign-batched":
        if kind != TYPE_BATCH:
            raise BadPacket(f"source-auth trailer type {kind} is not 2 (sign-batched)")
        if n < BATCH_FIXED_LEN + MIN_PROTECTED_LEN:
            raise BadPacket("packet too short for a batch trailer")
        count = mv[n - 3] + 1
        index = mv[n - 2]
        if index >= count:
            raise BadPacket(f"batch index {index} is not below the window size {count}")
        plen = (count - 1).bit_length() * HASH_LEN
        end = n - BATCH_FIXED_LEN - plen
        if end < MIN_PROTECTED_LEN:
            raise BadPacket("packet too short for its batch trailer")
        sig_at = n - BATCH_FIXED_LEN
        return mv[:end], (count, index, bytes(mv[end:sig_at]), bytes(mv[sig_at:sig_at + SIG_LEN]))
    raise LocalProtocolError(f"source_auth mode {mode!r} carries no trailer")


def trailer_len(mode: str, count: int = 1) -> int:
    """Bytes a packet grows by (for MTU accounting). ``count`` is the window size."""
    if mode == "none":
        return 0
    if mode == "sign":
        return SIGN_TRAILER_LEN
    return BATCH_FIXED_LEN + tree_depth(count) * HASH_LEN


# --- the sender side ---------------------------------------------------------------------------


class BatchSigner:
    """Mode "sign-batched" on protected packets: collect a window, sign its Merkle root once.

    A packet waits until its window closes: after ``max_packets`` packets, or ``max_delay``
    seconds after the window's first packet (``get_timer``/``handle_timer(now)``), whichever
    comes first. ``add`` and ``handle_timer`` return the packets ready to send, in order.
    """

    def __init__(self, key: Ed25519PrivateKey, max_packets: int = DEFAULT_MAX_PACKETS,
                 max_delay: float = DEFAULT_MAX_DELAY) -> None:
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError("the signing key must be an Ed25519PrivateKey")
        if not 1 <= max_packets <= MAX_WINDOW:
            raise PolicyError(f"sign-batched window of {max_packets} packets is outside 1..{MAX_WINDOW}")
        if not 0 < max_delay <= 1.0:
            raise PolicyError(f"sign-batched latency bound {max_delay}s is outside (0, 1]")
        self._key = key
        self.max_packets = max_packets
        self.max_delay = max_delay
        self._window: list[bytes] = []
        self._deadline: float | None = None
        self.windows = 0
        self.packets = 0

    def add(self, packet: bytes, now: float) -> list[bytes]:
        window = self._window
        if not window:
            self._deadline = now + self.max_delay
        window.append(packet)
        if len(window) >= self.max_packets:
            return self.flush()
        return []

    def get_timer(self) -> float | None:
        """When the open window must be sent (None: nothing is waiting)."""
        return self._deadline

    def handle_timer(self, now: float) -> list[bytes]:
        if self._deadline is not None and now >= self._deadline:
            return self.flush()
        return []

    def pending(self) -> int:
        return len(self._window)

    def flush(self) -> list[bytes]:
        """Close the window now (also at shutdown and before a rekey switches SA)."""
        window, self._window, self._deadline = self._window, [], None
        if not window:
            return []
        count = len(window)
        sha = _sha256
        leaves = []
        for p in window:  # leaf_hash, inline
            h = sha(_LEAF)
            h.update(p)
            leaves.append(h.digest())
        levels = build_tree(leaves)
        sig = self._key.sign(batch_message(count, levels[-1][0]))
        self.windows += 1
        self.packets += count
        # P || PATH || SIG || COUNT-1 || INDEX || 0x02, each packet in one join: PATH is the
        # sibling per level, columns built a level at a time
        cols = [[lvl[(i >> k) ^ 1] for i in range(count)] for k, lvl in enumerate(levels[:-1])]
        return [b"".join(parts) for parts in zip(window, *cols, repeat(sig + bytes((count - 1,))), _INDEX_TYPE)]

    def __repr__(self) -> str:
        return f"BatchSigner(max_packets={self.max_packets}, max_delay={self.max_delay}, pending={len(self._window)})"


class _SealingSA(Protocol):
    params: SAParams

    def seal_esp(self, next_header: int, payload: bytes, now: float) -> bytes: ...


class _OpeningSA(Protocol):
    params: SAParams

    def open_esp_untrusted(self, data: bytes | memoryview, now: float) -> Any: ...

    def window_for(self, sender_id: int) -> ReplayWindow: ...

    def count_drop(self, exc: PacketDropped) -> None: ...


class SigningSealer:
    """An outbound SA that signs what it seals. ``seal_esp`` returns a list of packets ready to
    send: one per call in modes "none" and "sign", a whole window (or nothing yet) in
    "sign-batched". Call ``handle_timer(now)`` at ``get_timer()`` and ``flush()`` before
    dropping the sealer, or the last window's packets are never sent."""

    def __init__(self, sa: _SealingSA, signing_key: Ed25519PrivateKey | None, mode: str, *,
                 max_packets: int = DEFAULT_MAX_PACKETS, max_delay: float = DEFAULT_MAX_DELAY) -> None:
        check_mode(mode)
        if mode != "none" and not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError(f"source_auth {mode!r} needs an Ed25519PrivateKey")
        self.sa = sa
        self.mode = mode
        self._key = signing_key if mode != "none" else None
        self._batch = BatchSigner(signing_key, max_packets, max_delay) \
            if mode == "sign-batched" and signing_key is not None else None
        self._signed = 0
        self._add = self._batch.add if self._batch is not None else None

    def seal_esp(self, next_header: int, payload: bytes, now: float) -> list[bytes]:
        add = self._add
        if add is not None:  # "sign-batched": sign() without its dispatch
            return add(self.sa.seal_esp(next_header, payload, now), now)
        return self.sign(self.sa.seal_esp(next_header, payload, now), now)

    def sign(self, packet: bytes, now: float) -> list[bytes]:
        """Sign a packet this sealer's SA already protected."""
        if self._batch is not None:
            return self._batch.add(packet, now)
        if self._key is not None:
            self._signed += 1
            return [sign_packet(self._key, packet)]
        return [packet]

    def get_timer(self) -> float | None:
        return self._batch.get_timer() if self._batch is not None else None

    def handle_timer(self, now: float) -> list[bytes]:
        return self._batch.handle_timer(now) if self._batch is not None else []

    def flush(self) -> list[bytes]:
        return self._batch.flush() if self._batch is not None else []

    @property
    def signatures(self) -> int:
        """Ed25519 signatures made: one per packet ("sign"), one per window ("sign-batched")."""
        return self._batch.windows if self._batch is not None else self._signed

    def statistics(self) -> dict[str, Any]:
        return {"mode": self.mode, "signatures": self.signatures,
                "pending": self._batch.pending() if self._batch is not None else 0}

    def __repr__(self) -> str:
        return f"SigningSealer(spi={self.sa.params.spi:#x}, mode={self.mode!r})"


# --- the receiver side -------------------------------------------------------------------------


def load_public_key_untrusted(raw: bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """A sender's public key from its 32 raw octets. Raises ``RemoteProtocolError``."""
    if isinstance(raw, Ed25519PublicKey):
        return raw
    if not isinstance(raw, bytes | bytearray) or len(raw) != 32:
        raise RemoteProtocolError("a sender key must be 32 octets (raw Ed25519)", "bad-message")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes(raw))
    except ValueError:
        raise RemoteProtocolError("not an Ed25519 public key", "bad-message") from None


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw octets that the control protocol carries (``sender_keys`` maps)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def sender_key_id_untrusted(params: SAParams, packet: bytes | memoryview) -> int:
    """Whose key verifies this packet: the RFC 6054 sender ID in the IV's top bits on a shared
    SA (``sender_id_bits`` > 0), the SPI on a per-sender SA. Raises only ``BadPacket``."""
    bits = params.sender_id_bits
    if not bits:
        return params.spi
    if len(packet) < 16:
        raise BadPacket("packet too short for an ESP header with an IV")
    return int(_IV64.unpack_from(packet, 8)[0] >> (64 - bits))


class SenderKeys:
    """The authorized senders' public keys of one group (level), by sender ID or SPI. One
    table may serve every verifier of the group; removing a key revokes that sender at once."""

    def __init__(self, keys: Mapping[int, bytes | Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[int, Ed25519PublicKey] = {}
        self._raw: dict[int, bytes] = {}
        if keys:
            self.replace(keys)

    def set(self, key_id: int, key: bytes | Ed25519PublicKey) -> None:
        if isinstance(key_id, bool) or not isinstance(key_id, int) or not 0 <= key_id <= 0xFFFFFFFF:
            raise RemoteProtocolError(f"sender key ID {key_id!r} is not a 32-bit unsigned int", "bad-message")
        pub = load_public_key_untrusted(key)
        raw = public_key_bytes(pub)
        if self._raw.get(key_id) != raw:  # keep the object (and the verified-window cache) if unchanged
            self._keys[key_id] = pub
            self._raw[key_id] = raw

    def remove(self, key_id: int) -> None:
        """Revoke: this sender's packets fail from now on (cached windows included)."""
        self._keys.pop(key_id, None)
        self._raw.pop(key_id, None)

    def replace(self, keys: Mapping[int, bytes | Ed25519PublicKey]) -> None:
        """Make the table exactly ``keys`` (a GroupInstall's ``sender_keys``)."""
        for key_id in [k for k in self._keys if k not in keys]:
            self.remove(key_id)
        for key_id, key in keys.items():
            self.set(key_id, key)

    def get(self, key_id: int) -> Ed25519PublicKey | None:
        return self._keys.get(key_id)

    def ids(self) -> list[int]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __repr__(self) -> str:
        return f"SenderKeys(ids={self.ids()})"


class SourceAuthenticator:
    """The receiver's check, on bytes: ``verify_untrusted(data, key_id)`` returns P (``data``
    without the trailer: a memoryview, or in "sign-batched" a slice of ``data``'s type) when the
    sender ``key_id`` signed it, and raises
    ``SourceAuthFailed`` (unknown/revoked sender, bad signature, packet not in its signed
    window) or ``BadPacket`` (malformed trailer) otherwise.

    "sign-batched": a window's signature is verified once. The verifier remembers, per
    (sender, signature, count), the tree nodes that are authenticated (the root, and every
    node and sibling on a path that hashed up to it); a later packet of the window stops
    hashing at the first authenticated node it reaches. The cache is LRU, ``max_windows``
    entries, and an entry only counts while the sender's key object is the one that
    verified it (revocation and key changes invalidate it)."""

    def __init__(self, keys: SenderKeys | Mapping[int, bytes | Ed25519PublicKey], mode: str,
                 max_windows: int = DEFAULT_MAX_WINDOWS) -> None:
        check_mode(mode)
        if mode == "none":
            raise PolicyError("source_auth 'none' needs no verifier")
        self.keys = keys if isinstance(keys, SenderKeys) else SenderKeys(keys)
        self._get_key = self.keys._keys.get  # the live dict: revocations apply at once
        self.mode = mode
        self.max_windows = max_windows
        # window signature -> (sender key ID, COUNT-1, the key that verified it, authenticated
        # nodes by (level << 8) | index); oldest first, at most max_windows
        self._windows: dict[bytes, tuple[int, int, Ed25519PublicKey, dict[int, bytes]]] = {}
        self.verified = 0
        self.failed = 0
        self.signature_checks = 0
        self.cache_hits = 0

    def _key(self, key_id: int) -> Ed25519PublicKey:
        pub = self.keys.get(key_id)
        if pub is None:
            self.failed += 1
            raise SourceAuthFailed(f"no authorized sender key for {key_id} (unknown or revoked sender)")
        return pub

    def _fail(self, what: str) -> SourceAuthFailed:
        self.failed += 1
        return SourceAuthFailed(what)

    def verify_untrusted(self, data: bytes | memoryview, key_id: int,
                         precheck: Callable[[bytes | memoryview, int], None] | None = None) -> bytes | memoryview:
        """``precheck(data, key_id)`` runs just before a signature is verified (never on the
        cheap cached path); ``SourceVerifier`` passes its replay-window check."""
        if self.mode == "sign-batched":
            return self._verify_batched(data, key_id, precheck)
        packet, sig = parse_trailer_untrusted(data, "sign")
        pub = self._key(key_id)
        if precheck is not None:
            precheck(data, key_id)
        self.signature_checks += 1
        try:
            pub.verify(sig, SIGN_CONTEXT + packet)
        except InvalidSignature:
            raise self._fail("source signature did not verify") from None
        self.verified += 1
        return packet

    def _verify_batched(self, data: bytes | memoryview, key_id: int,
                        precheck: Callable[[bytes | memoryview, int], None] | None) -> bytes | memoryview:
        # the per-packet path: parse_trailer_untrusted's checks inlined, then the cache. P is a
        # slice of ``data`` (bytes for bytes: the SA then slices bytes, which is cheaper than
        # slicing a memoryview; a view for a view, as the data path's receive buffer is)
        n = len(data)
        if n < BATCH_FIXED_LEN + MIN_PROTECTED_LEN or data[n - 1] != TYPE_BATCH:
            parse_trailer_untrusted(data, "sign-batched")  # raises the precise BadPacket
        c1 = data[n - 3]
        idx = data[n - 2]
        if idx > c1:
            raise BadPacket(f"batch index {idx} is not below the window size {c1 + 1}")
        depth = c1.bit_length()
        end = n - BATCH_FIXED_LEN - depth * HASH_LEN
        if end < MIN_PROTECTED_LEN:
            raise BadPacket("packet too short for its batch trailer")
        pub = self._get_key(key_id)
        if pub is None:
            raise self._fail(f"no authorized sender key for {key_id} (unknown or revoked sender)")
        packet = data[:end]
        sig = bytes(data[n - BATCH_FIXED_LEN:n - 3])
        h = _sha256(_LEAF)
        h.update(packet)
        node = h.digest()
        entry = self._windows.get(sig)
        nodes = entry[3] if entry is not None and entry[2] is pub and entry[0] == key_id and entry[1] == c1 \
            else None
        # authenticated nodes are keyed (level << 8) | index
        if nodes is not None:
            known = nodes.get(idx)
            if known is not None:  # the leaf itself is known (a sibling on a verified path)
                if known != node:  # public hashes: no timing secret here
                    raise self._fail("packet is not in its sender's signed window")
                self.cache_hits += 1
                self.verified += 1
                return packet
        learned: dict[int, bytes] = {}
        at = end
        for k in range(depth):
            sib = bytes(data[at:at + HASH_LEN])
            at += HASH_LEN
            key = (k << 8) | idx
            learned[key] = node
            learned[key ^ 1] = sib
            node = _sha256(_NODE + sib + node).digest() if idx & 1 else _sha256(_NODE + node + sib).digest()
            idx >>= 1
            if nodes is not None:
                known = nodes.get(((k + 1) << 8) | idx)
                if known is not None:
                    if known != node:
                        raise self._fail("packet is not in its sender's signed window")
                    nodes.update(learned)
                    self.cache_hits += 1
                    self.verified += 1
                    return packet
        # not cached (or the sender's key changed): verify the window's signature once
        if precheck is not None:
            precheck(data, key_id)
        self.signature_checks += 1
        try:
            pub.verify(sig, batch_message(c1 + 1, node))
        except InvalidSignature:
            raise self._fail("window signature did not verify") from None
        learned[depth << 8] = node
        windows = self._windows
        windows[sig] = (key_id, c1, pub, learned)
        while len(windows) > self.max_windows:
            del windows[next(iter(windows))]
        self.verified += 1
        return packet

    def statistics(self) -> dict[str, Any]:
        return {"mode": self.mode, "senders": len(self.keys), "verified": self.verified,
                "source_auth_failed": self.failed, "signature_checks": self.signature_checks,
                "cache_hits": self.cache_hits, "cached_windows": len(self._windows)}


class SourceVerifier:
    """An inbound SA whose packets must carry their sender's signature. ``open_esp_untrusted``
    has the SA's signature and returns what the SA returns: (next header, payload, sender ID).

    Order (docs/SOURCE_AUTH.md "Receiver processing"): parse the trailer; look the sender's key
    up (unknown or revoked: ``SourceAuthFailed``); check the sequence number against the SA's
    replay window without changing it (a replayed copy of a genuine packet costs no signature
    check); verify the signature or the window's Merkle path; only then let the SA verify the
    group ICV, decrypt and *move its replay window*. So the window only ever moves for packets
    that the named sender signed: a member holding the group key cannot burn a sender's
    sequence numbers (or push its window past them) with forgeries. Every drop is counted on
    the SA under its ``reason`` (``source-auth-failed`` for a forgery)."""

    def __init__(self, sa: _OpeningSA, keys: SenderKeys | Mapping[int, bytes | Ed25519PublicKey] | SourceAuthenticator,
                 mode: str | None = None, *, max_windows: int = DEFAULT_MAX_WINDOWS,
                 key_id: int | None = None) -> None:
        """``key_id``: on a per-sender SA, the owner's sender ID (from the grant's ``owners``)
        when ``keys`` is indexed by sender ID; by default a per-sender SA's key ID is its SPI.
        On a shared SA the sender ID always comes from the packet's IV."""
        self.sa = sa
        if isinstance(keys, SourceAuthenticator):
            if mode is not None and mode != keys.mode:
                raise LocalProtocolError(f"authenticator is for {keys.mode!r}, not {mode!r}")
            self.auth = keys
        else:
            self.auth = SourceAuthenticator(keys, mode or "sign", max_windows)
        self.mode = self.auth.mode
        bits = sa.params.sender_id_bits
        self._shared = bits > 0
        self._shift = 64 - bits if bits else 0
        self._verify = self.auth._verify_batched if self.mode == "sign-batched" else self.auth.verify_untrusted
        self._precheck = self._replay_precheck
        self._key_id = sa.params.spi if key_id is None else key_id

    def open_esp_untrusted(self, data: bytes | memoryview, now: float) -> tuple[int, bytes, int]:
        sa = self.sa
        try:
            shift = self._shift
            if shift:
                if len(data) < 16:
                    raise BadPacket("packet too short for an ESP header with an IV")
                key_id = _IV64.unpack_from(data, 8)[0] >> shift  # the RFC 6054 sender ID
            elif len(data) < MIN_PROTECTED_LEN:
                raise BadPacket("packet too short for an ESP header")
            else:
                key_id = self._key_id  # the SPI, or the owner's sender ID
            packet = self._verify(data, key_id, self._precheck)
        except PacketDropped as exc:
            sa.count_drop(exc)
            raise
        return sa.open_esp_untrusted(packet, now)  # type: ignore[no-any-return]

    def _replay_precheck(self, data: bytes | memoryview, key_id: int) -> None:
        """Before a signature check: refuse a sequence number the SA's window already holds
        (changes nothing; the SA checks again, and commits, after its ICV)."""
        self.sa.window_for(key_id if self._shared else 0).check(_SPI.unpack_from(data, 4)[0])

    def statistics(self) -> dict[str, Any]:
        return self.auth.statistics()

    def __repr__(self) -> str:
        return f"SourceVerifier(spi={self.sa.params.spi:#x}, mode={self.mode!r})"


# --- policy and key helpers for the controller -------------------------------------------------


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PolicyError(f"source_auth {mode!r} is not one of {', '.join(MODES)}")


def source_auth_refusal(mode: str, datapath: str) -> str | None:
    """Why a member on ``datapath`` cannot take part in a group with ``source_auth = mode``, or
    None. Linux XFRM has no signature transform: an XFRM member could neither sign nor verify."""
    check_mode(mode)
    if mode != "none" and datapath == "xfrm":
        return (f"source_auth {mode!r} needs the userspace data path: the kernel (xfrm) has no signature "
                "transform; set source_auth = 'none' or use the userspace data path")
    return None


def check_source_auth_datapaths(group: str, mode: str, member_datapaths: Mapping[str, str]) -> None:
    """Refuse ``source_auth`` for a group with members on the kernel (XFRM) data path.

    ``member_datapaths`` maps member name -> data path kind ("userspace", "xfrm", ...).
    Raises ``PolicyError`` naming the group, the mode and the offending members."""
    check_mode(mode)
    xfrm = sorted(name for name, kind in member_datapaths.items() if source_auth_refusal(mode, kind))
    if xfrm:
        raise PolicyError(f"group {group}: {', '.join(xfrm)} use{'s' if len(xfrm) == 1 else ''} xfrm, but "
                          f"{source_auth_refusal(mode, 'xfrm')}")


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh sender signing key (the controller's choice when the sender brings none)."""
    return Ed25519PrivateKey.generate()


def _proof_message(member: str, group: str, level: str, public_raw: bytes) -> bytes:
    parts = [p.encode() for p in (member, group, level)]
    return KEY_PROOF_CONTEXT + b"".join(struct.pack("!H", len(p)) + p for p in parts) + public_raw


def make_key_proof(key: Ed25519PrivateKey, member: str, group: str, level: str = "") -> bytes:
    """Proof of possession a sender that brings its own key sends with its public key."""
    return key.sign(_proof_message(member, group, level, public_key_bytes(key)))


def check_key_proof_untrusted(public_raw: bytes, proof: bytes, member: str, group: str,
                              level: str = "") -> Ed25519PublicKey:
    """The controller's check before it certifies (distributes) a key a sender brought: the
    member named by its TLS certificate holds the private key for this group (level).
    Raises ``RemoteProtocolError`` (code "bad-message" or "not-authorized")."""
    pub = load_public_key_untrusted(public_raw)
    if not isinstance(proof, bytes) or len(proof) != SIG_LEN:
        raise RemoteProtocolError("key proof must be a 64-octet Ed25519 signature", "bad-message")
    try:
        pub.verify(proof, _proof_message(member, group, level, bytes(public_raw)))
    except InvalidSignature:
        raise RemoteProtocolError("key proof did not verify", "not-authorized") from None
    return pub


def sender_keys_wire(keys: Iterable[tuple[int, Ed25519PrivateKey | Ed25519PublicKey]]) -> dict[int, bytes]:
    """The ``sender_keys`` map of Grant/rekey messages: key ID -> 32 raw octets."""
    return {key_id: public_key_bytes(k) for key_id, k in keys}
