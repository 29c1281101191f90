"""LKH messages and the member side (pure): :class:`RekeyMessage`, :class:`MemberPath`,
:class:`MemberKeyState`. The controller's tree is in :mod:`groupsec.keys.lkh`, whose
docstring describes the scheme and both encodings; import everything from there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack

from groupsec.errors import BadRekey, ConfigError, LocalProtocolError
from groupsec.keys.wrap import KEY_LEN, WRAPPED_LEN, unwrap_key

ROOT_ID = 0
FORMAT = 1
MAX_INT = 2**63 - 1          # node IDs, versions and epochs
MAX_PATH = 64                # keys on one member's path
MAX_WRAPS = 65536            # wraps in one rekey message (a 1 MiB frame holds ~25,000)
MAX_BLOCKS = 65536
MAX_REMOVED = 65536
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

__all__ = [
    "ROOT_ID",
    "JoinResult",
    "MemberKeyState",
    "MemberPath",
    "PathKey",
    "RekeyMessage",
    "Wrap",
    "ceil_log",
]


def ceil_log(n: int, base: int) -> int:
    """The smallest k with base**k >= n (0 for n <= 1), in exact integer arithmetic."""
    k, cap = 0, 1
    while cap < n:
        cap *= base
        k += 1
    return k


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathKey:
    node_id: int
    version: int
    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Wrap:
    """The new key of ``target_id`` (at ``target_version``) wrapped under the key of
    ``wrapping_id`` at ``wrapping_version``."""

    target_id: int
    target_version: int
    wrapping_id: int
    wrapping_version: int
    wrapped: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MemberPath:
    """What a member is given over TLS: its keys, leaf first and the root (the KEK) last,
    valid at tree ``epoch``."""

    epoch: int
    leaf_id: int
    keys: tuple[PathKey, ...]

    @property
    def kek(self) -> bytes:
        return self.keys[-1].key

    def to_wire(self) -> list[Any]:
        return [FORMAT, self.epoch, self.leaf_id, [[k.node_id, k.version, k.key] for k in self.keys]]

    def encode(self) -> bytes:
        return _pack(self.to_wire())

    @classmethod
    def decode_untrusted(cls, data: bytes) -> MemberPath:
        return cls.from_wire_untrusted(_unpack(data))

    @classmethod
    def from_wire_untrusted(cls, obj: Any) -> MemberPath:
        """Validate an unpacked path. Raises only ``BadRekey`` (reason ``malformed``)."""
        if not isinstance(obj, list) or len(obj) != 4 or obj[0] != FORMAT or type(obj[0]) is not int:
            raise _bad("member path must be [1, epoch, leaf_id, keys]")
        epoch, leaf_id, raw = _uint(obj[1], "epoch"), _uint(obj[2], "leaf_id"), obj[3]
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PATH:
            raise _bad("member path keys must be a non-empty list")
        keys = []
        for item in raw:
            if not isinstance(item, list) or len(item) != 3:
                raise _bad("path key must be [node_id, version, key]")
            nid, ver, key = _uint(item[0], "node_id"), _uint(item[1], "version"), item[2]
            if not isinstance(key, bytes) or len(key) != KEY_LEN or ver > epoch:
                raise _bad("path key must be 32 bytes with version <= epoch")
            keys.append(PathKey(nid, ver, key))
        ids = [k.node_id for k in keys]
        if ids[0] != leaf_id or ids[-1] != ROOT_ID or len(set(ids)) != len(ids) or (len(ids) < 2):
            raise _bad("member path must run from the leaf to the root without repeats")
        return cls(epoch, leaf_id, tuple(keys))


@dataclass(frozen=True, slots=True)
class RekeyMessage:
    """One LKH rekey: the new keys of tree ``epoch``, wrapped bottom-up, plus the internal
    nodes that left the tree."""

    epoch: int
    wraps: tuple[Wrap, ...]
    removed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if any(w.target_version != self.epoch for w in self.wraps):
            raise ValueError("every key in a rekey message has version == epoch")

    @property
    def targets(self) -> tuple[int, ...]:
        """The nodes that get new keys, bottom-up, each once."""
        return tuple(dict.fromkeys(w.target_id for w in self.wraps))

    def to_wire(self) -> list[Any]:
        blocks: dict[int, tuple[list[int], list[bytes]]] = {}
        for w in self.wraps:
            labels, blobs = blocks.setdefault(w.target_id, ([], []))
            labels += (w.wrapping_id, w.wrapping_version)
            blobs.append(w.wrapped)
        return [FORMAT, self.epoch, [[t, labels, b"".join(blobs)] for t, (labels, blobs) in blocks.items()],
                list(self.removed)]

    def encode(self) -> bytes:
        return _pack(self.to_wire())

    @classmethod
    def decode_untrusted(cls, data: bytes) -> RekeyMessage:
        """Parse rekey bytes. Raises only ``BadRekey`` (reason ``malformed``)."""
        return cls.from_wire_untrusted(_unpack(data))

    @classmethod
    def from_wire_untrusted(cls, obj: Any) -> RekeyMessage:
        """Validate an unpacked rekey (e.g. taken from an outer msgpack frame)."""
        if not isinstance(obj, list) or len(obj) != 4 or obj[0] != FORMAT or type(obj[0]) is not int:
            raise _bad("rekey must be [1, epoch, blocks, removed]")
        epoch, blocks, removed = _uint(obj[1], "epoch"), obj[2], obj[3]
        if epoch == 0:
            raise _bad("rekey epoch must be positive")
        if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
            raise _bad("rekey blocks must be a list")
        if not isinstance(removed, list) or len(removed) > MAX_REMOVED:
            raise _bad("removed must be a list")
        wraps: list[Wrap] = []
        seen: set[int] = set()
        for block in blocks:
            if not isinstance(block, list) or len(block) != 3:
                raise _bad("block must be [target_id, labels, wrapped]")
            target, labels, blob = _uint(block[0], "target_id"), block[1], block[2]
            if target in seen:
                raise _bad("a target appears twice")
            seen.add(target)
            if not isinstance(labels, list) or not labels or len(labels) % 2:
                raise _bad("labels must be a non-empty list of (wrapping_id, wrapping_version) pairs")
            count = len(labels) // 2
            if len(wraps) + count > MAX_WRAPS:
                raise _bad("too many wraps")
            if not isinstance(blob, bytes) or len(blob) != count * WRAPPED_LEN:
                raise _bad("wrapped bytes do not match the labels")
            for i in range(count):
                wid, wver = _uint(labels[2 * i], "wrapping_id"), _uint(labels[2 * i + 1], "wrapping_version")
                if wver > epoch or (wid == target and wver == epoch):
                    raise _bad("a wrap is under a key newer than the message or under itself")
                wraps.append(Wrap(target, epoch, wid, wver, blob[i * WRAPPED_LEN:(i + 1) * WRAPPED_LEN]))
        return cls(epoch, tuple(wraps), tuple(_uint(r, "removed id") for r in removed))


@dataclass(frozen=True, slots=True)
class JoinResult:
    """``path`` goes to the newcomer over TLS. ``rekey`` (if not None) goes to the existing
    members: it is set when a leaf was split or backward access control refreshed the path."""

    path: MemberPath
    rekey: RekeyMessage | None


def _bad(msg: str) -> BadRekey:
    return BadRekey(msg, "malformed")


def _uint(v: Any, what: str) -> int:
    if type(v) is not int or not 0 <= v <= MAX_INT:
        raise _bad(f"{what} must be an unsigned integer")
    return v


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: Any) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_MESSAGE_BYTES:
        raise _bad("rekey must be bytes of bounded size")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, ext_hook=_no_ext,
                               max_bin_len=MAX_MESSAGE_BYTES,
                               max_str_len=0, max_array_len=2 * MAX_WRAPS, max_map_len=0)
    except BadRekey:
        raise
    except Exception as exc:
        raise _bad(f"undecodable msgpack: {type(exc).__name__}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise _bad(f"msgpack extension type {code} is not allowed")


# --- member side ----------------------------------------------------------------------------


class MemberKeyState:
    """A member's LKH keys. Feed it every rekey message of the group, in order."""

    def __init__(self, path: MemberPath) -> None:
        self.reset(path)

    def reset(self, path: MemberPath) -> None:
        """Replace the state with a fresh path from the controller (registration or resync)."""
        if path.keys[-1].node_id != ROOT_ID:
            raise LocalProtocolError("a member path must end at the root")
        self.epoch = path.epoch
        self.leaf_id = path.leaf_id
        self._keys: dict[int, tuple[int, bytes]] = {k.node_id: (k.version, k.key) for k in path.keys}

    @property
    def kek(self) -> bytes:
        return self._keys[ROOT_ID][1]

    @property
    def kek_version(self) -> int:
        return self._keys[ROOT_ID][0]

    @property
    def keys(self) -> tuple[PathKey, ...]:
        """Every key held (the path, plus nothing else once stale keys were dropped)."""
        return tuple(PathKey(i, v, k) for i, (v, k) in self._keys.items())

    def apply_rekey(self, msg: RekeyMessage) -> bytes:
        """Open the wraps meant for this member, bottom-up, and return the KEK after ``msg``.

        All or nothing: on error the state is unchanged. Raises ``BadRekey`` with reason
        ``lkh-stale`` (epoch already applied), ``lkh-gap`` (a message was missed: resync),
        ``lkh-cannot-derive`` (the new KEK is not reachable from our keys: evicted, or out of
        sync) or ``unwrap-failed`` (a wrap under a key we hold does not open)."""
        if msg.epoch <= self.epoch:
            raise BadRekey(f"LKH epoch {msg.epoch} is not newer than {self.epoch}", "lkh-stale")
        if msg.epoch != self.epoch + 1:
            raise BadRekey(f"LKH epoch {msg.epoch} skips from {self.epoch}", "lkh-gap")
        under: dict[tuple[int, int], list[Wrap]] = {}
        for w in msg.wraps:
            under.setdefault((w.wrapping_id, w.wrapping_version), []).append(w)
        keys = dict(self._keys)
        todo = deque((i, v) for i, (v, _k) in keys.items())
        while todo:  # a new key may open the next wrap up: follow them to the root
            label = todo.popleft()
            for w in under.get(label, ()):
                held = keys.get(w.target_id)
                if held is not None and held[0] >= w.target_version:
                    continue
                new = unwrap_key(keys[label[0]][1], w.wrapped, w.target_id, w.target_version,
                                 w.wrapping_id, w.wrapping_version)
                keys[w.target_id] = (w.target_version, new)
                todo.append((w.target_id, w.target_version))
        if ROOT_ID in msg.targets and keys[ROOT_ID][0] != msg.epoch:
            raise BadRekey("the new KEK cannot be derived from this member's keys", "lkh-cannot-derive")
        for nid in (*msg.targets, *msg.removed):  # keys we hold for nodes no longer ours
            if nid in keys and keys[nid][0] != msg.epoch and nid != ROOT_ID:
                del keys[nid]
        if self.leaf_id not in keys:
            raise BadRekey("this member's leaf left the tree", "lkh-cannot-derive")
        self._keys = keys
        self.epoch = msg.epoch
        return self.kek

    def to_dict(self) -> dict[str, Any]:
        """For the agent's state file (contains keys: mode 0600, never log)."""
        return {"epoch": self.epoch, "leaf_id": self.leaf_id,
                "keys": [[i, v, k] for i, (v, k) in self._keys.items()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemberKeyState:
        try:
            keys = [PathKey(int(i), int(v), bytes(k)) for i, v, k in d["keys"]]
            root = [k for k in keys if k.node_id == ROOT_ID]
            path = MemberPath(int(d["epoch"]), int(d["leaf_id"]),
                              tuple(k for k in keys if k.node_id != ROOT_ID) + tuple(root))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"LKH member state is corrupt: {type(exc).__name__}") from None
        if not root or any(len(k.key) != KEY_LEN for k in keys):
            raise ConfigError("LKH member state is corrupt: no root key or a bad key length")
        return cls(path)

    def __repr__(self) -> str:
        return f"MemberKeyState(epoch={self.epoch}, leaf_id={self.leaf_id}, keys={len(self._keys)})"
