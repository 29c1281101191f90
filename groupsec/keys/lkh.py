"""LKH: a logical key hierarchy for scalable group rekeying (RFC 2627; carried by RFC 9838).

Pure code: no I/O, no clock. Controller side: :class:`LKHTree`. Member side:
:class:`MemberKeyState`. Messages: :class:`RekeyMessage` (multicast to the whole group) and
:class:`MemberPath` (a member's own keys, sent over its TLS session at registration or resync).

The tree
    A d-ary tree per group (``degree``, default 4; see ``DEFAULT_DEGREE``). Every member is a
    leaf holding its own individual key; every node has a stable integer ID (never reused), a
    32-byte key from os.urandom and a version. The root has ID 0 (``ROOT_ID``) and its key is
    the group KEK. A member holds exactly the keys on its leaf-to-root path.

    The tree has an ``epoch`` that grows by one with every rekey message. Every key a message
    carries is new and has ``version == message.epoch``, so (node ID, version) names one key
    for the life of the group.

Join (:meth:`LKHTree.join`)
    The newcomer takes the slot that gives it the shallowest leaf: a free child slot of an
    internal node, or, when every internal node that shallow is full, a leaf that is split
    (a new internal node takes the leaf's place, with the old leaf and the newcomer below it;
    its key is wrapped for the old member under its leaf key: a one-wrap rekey message). With
    ``backward_access_control=True`` every key on the newcomer's path is refreshed and the new
    key is wrapped under the old key of the same node (one wrap per level), so the newcomer,
    who is given only the new keys, cannot read anything sent before it joined.

Eviction (:meth:`LKHTree.evict`, one or many members at once)
    The evicted leaves are removed, emptied subtrees are pruned, and a non-root node left
    with one child is spliced out (its child moves up). Every node on an evicted path that
    still exists then gets a new key, processed bottom-up, and each new key is wrapped under
    the (new or current) key of each of its remaining children. Shared ancestors are
    refreshed once. If the tree became too deep for the members left (``depth_bound``), the
    deepest members are moved to the shallowest free slots in the same message (their old
    and new paths are refreshed too, so a moved member keeps no key it should not have).

Balance
    ``depth() <= depth_bound(N) = max(1, ceil(log_d N)) + 1`` holds after every operation.
    Joins alone keep ``depth <= max(1, ceil(log_d N))`` (a leaf gets deeper only when every
    shallower slot is taken, i.e. when N exceeds a power of d). Evictions can leave deep
    leaves behind; the slack of one level means members are moved only when N has shrunk
    across a power of d, so the moves are rare and their cost is amortised over the
    evictions that made them necessary. A slot no deeper than the bound always exists
    (if every node above the bound were a full internal node, there would be at least
    d**bound > N members).

Wrapping: see :mod:`groupsec.keys.wrap` (AES-KW under an HKDF-derived, label-bound key).

Rekey message encoding (msgpack-friendly; :meth:`RekeyMessage.to_wire`)::

    [1, epoch, blocks, removed]
    block   = [target_id, [wrapping_id, wrapping_version, ...], wrapped]   # one per new key
              # wrapped = 40 bytes per (wrapping_id, wrapping_version) pair, concatenated;
              # the target's new version is ``epoch``; blocks come bottom-up
    removed = [node_id, ...]   # internal nodes that left the tree (members drop those keys)

Logically the message is the list of :class:`Wrap` tuples (target id, new version, wrapping
id, wrapping version, wrapped bytes) in ``RekeyMessage.wraps``.

Member path encoding (:meth:`MemberPath.to_wire`)::

    [1, epoch, leaf_id, [[node_id, version, key], ...]]      # leaf first, root (ID 0) last

Secrets: ``MemberPath``, ``MemberKeyState`` and ``LKHTree.to_dict()`` contain keys. Never log
them; their ``repr`` shows IDs and versions only. Store the tree dict with mode 0600.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from groupsec.errors import BadRekey, ConfigError, LocalProtocolError
from groupsec.keys.wrap import KEY_LEN, WRAPPED_LEN, unwrap_key, wrap_key

ROOT_ID = 0
DEFAULT_DEGREE = 3
MIN_DEGREE = 2
MAX_DEGREE = 64
FORMAT = 1
MAX_INT = 2**63 - 1          # node IDs, versions and epochs
MAX_PATH = 64                # keys on one member's path
MAX_WRAPS = 65536            # wraps in one rekey message (a 1 MiB frame holds ~25,000)
MAX_BLOCKS = 65536
MAX_REMOVED = 65536
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

__all__ = [
    "DEFAULT_DEGREE",
    "ROOT_ID",
    "JoinResult",
    "LKHTree",
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


# --- controller side ------------------------------------------------------------------------


class _Node:
    __slots__ = ("children", "depth", "id", "key", "member", "parent", "version")

    def __init__(self, nid: int, version: int, key: bytes, parent: int | None, depth: int,
                 member: str | None = None) -> None:
        self.id = nid
        self.version = version
        self.key = key
        self.parent = parent
        self.depth = depth
        self.member = member
        self.children: list[int] = []


class LKHTree:
    """The controller's key tree for one group (or one security level of a group)."""

    def __init__(self, degree: int = DEFAULT_DEGREE, *, backward_access_control: bool = False) -> None:
        if type(degree) is not int or not MIN_DEGREE <= degree <= MAX_DEGREE:
            raise ConfigError(f"LKH degree must be an integer in {MIN_DEGREE}..{MAX_DEGREE}, not {degree!r}")
        self.degree = degree
        self.backward_access_control = bool(backward_access_control)
        self.epoch = 0
        self._next_id = ROOT_ID + 1
        self._nodes: dict[int, _Node] = {ROOT_ID: _Node(ROOT_ID, 0, os.urandom(KEY_LEN), None, 0)}
        self._by_member: dict[str, int] = {}
        # candidate slots per depth, validated lazily when looked at (see _valid_*)
        self._open: dict[int, deque[int]] = {0: deque([ROOT_ID])}
        self._leaves: dict[int, deque[int]] = {}

    # ---- queries

    def __len__(self) -> int:
        return len(self._by_member)

    def __contains__(self, member: object) -> bool:
        return member in self._by_member

    def __repr__(self) -> str:
        return (f"LKHTree(degree={self.degree}, members={len(self)}, epoch={self.epoch}, depth={self.depth()}, "
                f"backward_access_control={self.backward_access_control})")

    def members(self) -> list[str]:
        return list(self._by_member)

    @property
    def kek(self) -> bytes:
        return self._nodes[ROOT_ID].key

    @property
    def kek_version(self) -> int:
        return self._nodes[ROOT_ID].version

    def depth(self) -> int:
        """The depth of the deepest leaf (the root is at depth 0; 0 when empty)."""
        return max((d for d in list(self._leaves) if self._peek(self._leaves, d, self._valid_leaf, right=True)),
                   default=0)

    def depth_bound(self, n: int | None = None) -> int:
        """The depth this tree is kept within for ``n`` members (default: the current count)."""
        n = len(self) if n is None else n
        return max(1, ceil_log(n, self.degree)) + 1

    def depth_of(self, member: str) -> int:
        return self._nodes[self._leaf_id(member)].depth

    def deepest_member(self) -> str | None:
        """A member whose leaf is at the maximum depth (the costliest eviction)."""
        d = self.depth()
        nid = self._peek(self._leaves, d, self._valid_leaf, right=True) if d else None
        return None if nid is None else self._nodes[nid].member

    def path_for(self, member: str) -> MemberPath:
        """The member's current keys (registration, or resync after a lost rekey)."""
        node: _Node | None = self._nodes[self._leaf_id(member)]
        keys = []
        while node is not None:
            keys.append(PathKey(node.id, node.version, node.key))
            node = None if node.parent is None else self._nodes[node.parent]
        return MemberPath(self.epoch, keys[0].node_id, tuple(keys))

    def statistics(self) -> dict[str, int]:
        return {"members": len(self), "nodes": len(self._nodes), "depth": self.depth(), "epoch": self.epoch,
                "degree": self.degree}

    # ---- operations

    def join(self, member: str) -> JoinResult:
        """Add ``member``; see the module docstring. The result's ``path`` is for the newcomer
        (over TLS), its ``rekey`` (possibly None) for every other member."""
        if not isinstance(member, str) or not member:
            raise LocalProtocolError("a member name must be a non-empty string")
        if member in self._by_member:
            raise LocalProtocolError(f"{member!r} is already a member")
        needs_split = self._best_slot()[1] is not None
        # an empty group's root key is known to nobody (a fresh tree, or refreshed when the last
        # member was evicted), so there is nothing to refresh and nobody to send it to
        refresh = self.backward_access_control and len(self) > 0
        needs_msg = needs_split or refresh
        epoch = self.epoch + 1 if needs_msg else self.epoch
        parent, split = self._take_slot(epoch)
        wraps = [] if split is None else [self._wrap(parent, split)]
        leaf = self._attach(self._new_node(epoch, member), parent)
        if refresh:
            node = parent if split is None else self._nodes[parent.parent]  # type: ignore[index]
            while True:
                old_version, old_key = node.version, node.key
                node.version, node.key = epoch, os.urandom(KEY_LEN)
                wraps.append(Wrap(node.id, epoch, node.id, old_version,
                                  wrap_key(old_key, node.key, node.id, epoch, node.id, old_version)))
                if node.parent is None:
                    break
                node = self._nodes[node.parent]
        self.epoch = epoch
        self._by_member[member] = leaf.id
        return JoinResult(self.path_for(member), RekeyMessage(epoch, tuple(wraps)) if needs_msg else None)

    def evict(self, members: Iterable[str]) -> RekeyMessage:
        """Remove one or more members in ONE rekey message (send it to the remaining members;
        the evicted ones cannot use it)."""
        names = list(dict.fromkeys(members))
        if not names:
            raise LocalProtocolError("evict needs at least one member")
        for name in names:
            self._leaf_id(name)
        epoch = self.epoch + 1
        dirty: set[int] = set()
        removed: list[int] = []
        for name in names:
            leaf = self._nodes.pop(self._by_member.pop(name))
            removed.append(leaf.id)
            self._detach(leaf, dirty, removed)
        bound = self.depth_bound()
        while self.depth() > bound:  # rebalance: move the deepest members up
            leaf = self._nodes[self._peek(self._leaves, self.depth(), self._valid_leaf, right=True)]  # type: ignore[index]
            self._detach(leaf, dirty, removed)
            dirty.add(self._attach(leaf, self._take_slot(epoch)[0]).parent)  # type: ignore[arg-type]
        wraps = self._refresh(dirty, epoch)
        self.epoch = epoch
        return RekeyMessage(epoch, tuple(wraps), tuple(removed))

    # ---- bulk build and persistence

    @classmethod
    def bulk(cls, members: Iterable[str], degree: int = DEFAULT_DEGREE, *,
             backward_access_control: bool = False) -> LKHTree:
        """A tree holding ``members`` in the shape joins would give it, built without
        messages (nobody holds a key yet: hand each member ``path_for(member)``)."""
        tree = cls(degree, backward_access_control=backward_access_control)
        for member in members:
            if not isinstance(member, str) or not member or member in tree._by_member:
                raise LocalProtocolError(f"bad or duplicate member name {member!r}")
            tree._by_member[member] = tree._attach(tree._new_node(0, member), tree._take_slot(0)[0]).id
        return tree

    def to_dict(self) -> dict[str, Any]:
        """The whole tree as plain msgpack/JSON-friendly types, for the controller's store.
        It CONTAINS EVERY KEY: store it with mode 0600 and never log it."""
        nodes = []
        todo = deque([ROOT_ID])
        while todo:  # parents before children, children in order
            n = self._nodes[todo.popleft()]
            nodes.append([n.id, n.version, n.key, -1 if n.parent is None else n.parent, n.member])
            todo.extend(n.children)
        return {"format": FORMAT, "degree": self.degree, "backward_access_control": self.backward_access_control,
                "epoch": self.epoch, "next_id": self._next_id, "nodes": nodes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LKHTree:
        """Rebuild a tree from :meth:`to_dict`. Raises ``ConfigError`` if it is inconsistent."""
        try:
            if d["format"] != FORMAT:
                raise ValueError("unknown format")
            tree = cls(d["degree"], backward_access_control=bool(d["backward_access_control"]))
            tree.epoch, tree._next_id = int(d["epoch"]), int(d["next_id"])
            tree._nodes.clear()
            tree._open.clear()
            for nid, version, key, parent, member in d["nodes"]:
                if (type(nid) is not int or type(version) is not int or not isinstance(key, bytes)
                        or len(key) != KEY_LEN or not 0 <= version <= tree.epoch or nid in tree._nodes
                        or not 0 <= nid < tree._next_id or (member is not None and not isinstance(member, str))):
                    raise ValueError(f"bad node {nid!r}")
                if parent == -1:
                    if nid != ROOT_ID or member is not None:
                        raise ValueError("only node 0 may be the root, and it is no leaf")
                    tree._nodes[nid] = _Node(nid, version, bytes(key), None, 0)
                    continue
                p = tree._nodes[parent]
                if p.member is not None or len(p.children) >= tree.degree:
                    raise ValueError(f"node {nid} hangs under a leaf or a full node")
                tree._nodes[nid] = _Node(nid, version, bytes(key), parent, p.depth + 1, member)
                p.children.append(nid)
                if member is not None:
                    if member in tree._by_member:
                        raise ValueError("duplicate member")
                    tree._by_member[member] = nid
            if ROOT_ID not in tree._nodes:
                raise ValueError("no root")
            for n in tree._nodes.values():
                if n.member is None and not n.children and n.id != ROOT_ID:
                    raise ValueError(f"internal node {n.id} has no children")
                tree._index(n)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"LKH tree state is corrupt: {exc}"[:200]) from None
        return tree

    # ---- internals

    def _leaf_id(self, member: str) -> int:
        try:
            return self._by_member[member]
        except (KeyError, TypeError):
            raise LocalProtocolError(f"{member!r} is not a member") from None

    def _new_node(self, version: int, member: str | None = None) -> _Node:
        node = _Node(self._next_id, version, os.urandom(KEY_LEN), None, 0, member)
        self._next_id += 1
        self._nodes[node.id] = node
        return node

    def _wrap(self, target: _Node, under: _Node) -> Wrap:
        return Wrap(target.id, target.version, under.id, under.version,
                    wrap_key(under.key, target.key, target.id, target.version, under.id, under.version))

    def _index(self, node: _Node) -> None:
        """Note ``node`` as a candidate slot at its depth (entries are checked when used)."""
        if node.member is not None:
            q = self._leaves.setdefault(node.depth, deque())
        elif len(node.children) < self.degree:
            q = self._open.setdefault(node.depth, deque())
        else:
            return
        if not q or q[-1] != node.id:
            q.append(node.id)

    def _valid_leaf(self, nid: int, depth: int) -> bool:
        n = self._nodes.get(nid)
        return n is not None and n.member is not None and n.parent is not None and n.depth == depth

    def _valid_open(self, nid: int, depth: int) -> bool:
        n = self._nodes.get(nid)
        return n is not None and n.member is None and n.depth == depth and len(n.children) < self.degree

    def _peek(self, index: dict[int, deque[int]], depth: int, valid: Any, right: bool = False) -> int | None:
        """The first valid entry at ``depth`` (dropping stale ones), or None."""
        q = index.get(depth)
        while q:
            nid = q[-1] if right else q[0]
            if valid(nid, depth):
                return nid
            q.pop() if right else q.popleft()
        index.pop(depth, None)
        return None

    def _best_slot(self) -> tuple[_Node, None] | tuple[None, _Node]:
        """Where a new leaf is shallowest: (open internal node, None) or (None, leaf to split)."""
        for d in sorted(set(self._open) | set(self._leaves)):
            nid = self._peek(self._open, d, self._valid_open)
            if nid is not None:
                return self._nodes[nid], None
            nid = self._peek(self._leaves, d, self._valid_leaf)
            if nid is not None:
                return None, self._nodes[nid]
        raise AssertionError("unreachable: the root is always internal")  # pragma: no cover

    def _take_slot(self, version: int) -> tuple[_Node, _Node | None]:
        """The parent for a new leaf at the shallowest slot, splitting a leaf (returned second,
        the new internal node gets ``version``) when that is shallower than any free slot."""
        parent, split = self._best_slot()
        if split is None:
            return parent, None  # type: ignore[return-value]
        return self._split(split, version), split

    def _attach(self, node: _Node, parent: _Node) -> _Node:
        parent.children.append(node.id)
        node.parent, node.depth = parent.id, parent.depth + 1
        self._index(node)
        self._index(parent)
        return node

    def _split(self, leaf: _Node, version: int) -> _Node:
        """Put a new internal node in ``leaf``'s place, with ``leaf`` as its first child."""
        parent = self._nodes[leaf.parent]  # type: ignore[index]
        x = self._new_node(version)
        parent.children[parent.children.index(leaf.id)] = x.id
        x.parent, x.depth = parent.id, parent.depth + 1
        x.children.append(leaf.id)
        leaf.parent, leaf.depth = x.id, x.depth + 1
        self._index(leaf)
        self._index(x)
        return x

    def _detach(self, leaf: _Node, dirty: set[int], removed: list[int]) -> None:
        """Take ``leaf`` out of the tree; prune what became empty, splice out one-child nodes."""
        p = self._nodes[leaf.parent]  # type: ignore[index]
        p.children.remove(leaf.id)
        leaf.parent = None
        dirty.add(p.id)
        while p.id != ROOT_ID and not p.children:  # prune empty internal nodes
            g = self._nodes[p.parent]  # type: ignore[index]
            g.children.remove(p.id)
            del self._nodes[p.id]
            removed.append(p.id)
            dirty.add(g.id)
            p = g
        if p.id != ROOT_ID and len(p.children) == 1:  # splice: the only child takes p's place
            c, g = self._nodes[p.children[0]], self._nodes[p.parent]  # type: ignore[index]
            g.children[g.children.index(p.id)] = c.id
            c.parent = g.id
            del self._nodes[p.id]
            removed.append(p.id)
            dirty.add(g.id)
            todo = [c]
            while todo:  # the subtree moves up one level
                n = todo.pop()
                n.depth -= 1
                self._index(n)
                todo.extend(self._nodes[i] for i in n.children)
            p = g
        self._index(p)

    def _refresh(self, dirty: set[int], epoch: int) -> list[Wrap]:
        """New keys for the dirty nodes and all their ancestors, bottom-up, each wrapped under
        every child's (new or current) key."""
        todo: set[int] = set()
        for nid in dirty:
            node = self._nodes.get(nid)
            while node is not None and node.id not in todo:
                todo.add(node.id)
                node = None if node.parent is None else self._nodes[node.parent]
        wraps: list[Wrap] = []
        for nid in sorted(todo, key=lambda i: -self._nodes[i].depth):
            node = self._nodes[nid]
            node.version, node.key = epoch, os.urandom(KEY_LEN)
            wraps.extend(self._wrap(node, self._nodes[c]) for c in node.children)
        return wraps

