"""LKH: a logical key hierarchy for scalable group rekeying (RFC 2627; carried by RFC 9838).

Pure code: no I/O, no clock. Controller side: :class:`LKHTree`. Member side:
:class:`MemberKeyState`. Messages: :class:`RekeyMessage` (multicast to the whole group) and
:class:`MemberPath` (a member's own keys, sent over its TLS session at registration or resync).

The tree
    A d-ary tree per group (``degree``, default 3: see ``DEFAULT_DEGREE``). Every member is a
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
    removed = [node_id, ...]   # nodes that left the tree: evicted leaves, pruned and spliced
                               # internal nodes (members drop those keys; an evicted member
                               # sees its own leaf here)

Logically the message is the list of :class:`Wrap` tuples (target id, new version, wrapping
id, wrapping version, wrapped bytes) in ``RekeyMessage.wraps``.

Members apply every rekey message of the group in epoch order (``MemberKeyState`` refuses a
gap with reason ``lkh-gap``: resync with ``LKHTree.path_for``). The newcomer of a join does
not apply that join's rekey: its ``MemberPath`` is already at the new epoch.

Member path encoding (:meth:`MemberPath.to_wire`)::

    [1, epoch, leaf_id, [[node_id, version, key], ...]]      # leaf first, root (ID 0) last

Secrets: ``MemberPath``, ``MemberKeyState`` and ``LKHTree.to_dict()`` contain keys. Never log
them; their ``repr`` shows IDs and versions only. Store the tree dict with mode 0600.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from typing import Any

from groupsec.errors import ConfigError, LocalProtocolError
from groupsec.keys.lkh_messages import (
    FORMAT,
    ROOT_ID,
    JoinResult,
    MemberKeyState,
    MemberPath,
    PathKey,
    RekeyMessage,
    Wrap,
    ceil_log,
)
from groupsec.keys.wrap import KEY_LEN, wrap_key

# d = 3 gives the fewest wraps per eviction (about (d-1) + d*(ceil(log_d N) - 1); d/ln d is
# smallest at d = e) and so the smallest eviction rekey: 32 wraps, 1,879 bytes at N = 100,000
# against 35 wraps, 2,001 bytes for d = 4 and 32 wraps, 1,916 bytes for d = 2 (measured with
# `groupsec bench evict`), with paths half as long as a binary tree's (11 keys, not 17).
DEFAULT_DEGREE = 3
MIN_DEGREE = 2
MAX_DEGREE = 64

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

    def refresh_kek(self) -> RekeyMessage:
        """A new root key (a scheduled KEK rollover, nobody leaves), wrapped under the current
        key of each child of the root: one message of at most ``degree`` wraps."""
        epoch = self.epoch + 1
        wraps = self._refresh({ROOT_ID}, epoch)
        self.epoch = epoch
        return RekeyMessage(epoch, tuple(wraps))

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

