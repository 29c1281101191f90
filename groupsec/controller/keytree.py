"""LKH key trees for the group levels configured with ``key_tree = "lkh"`` (controller side).

The level's KEK IS the root key of its tree (groupsec.keys.lkh). The level state keeps its
usual ``kek_epoch``/``keks`` fields, and they always agree with the tree::

    kek_epoch = st["lkh_base"] + tree.kek_version        keks[kek_epoch] == tree.kek

``lkh_base`` is fixed when the tree is created (the level's KEK epoch before it, plus one), and
the root's version only grows, so one epoch never names two KEKs. The tree and the level state
are written in ONE store commit, before any datagram that uses either leaves the controller.

Store key: ``lkh/<group>/<level>`` -> ``LKHTree.to_dict()`` (every node key: the SQLite file is
0600 and the etcd store seals values; never log it).

A tree message (join split, join with backward access control, eviction, KEK rollover) goes
out as a rekey datagram whose inner map carries ``"lkh": RekeyMessage.encode()`` and
``"lkh_kek_epoch"`` (the KEK epoch the member's derived root key belongs to), encrypted under
the KEK epoch members hold BEFORE the message (docs/PROTOCOL.md s9).
"""

from __future__ import annotations

import logging
from typing import Any

from groupsec.controller.config import LevelConfig
from groupsec.controller.store import Store
from groupsec.keys.lkh import LKHTree, RekeyMessage

log = logging.getLogger("groupsec.controller.keytree")


def tree_key(lc: LevelConfig) -> str:
    return f"lkh/{lc.group}/{lc.level}"


def tree_epoch(st: dict[str, Any], tree: LKHTree) -> int:
    """The KEK epoch of the tree's current root key."""
    return int(st["lkh_base"]) + tree.kek_version


def adopt_root(st: dict[str, Any], tree: LKHTree, now: float) -> int:
    """Make the level state's KEK follow the tree's root (after a tree operation); returns the
    KEK epoch. The previous KEK is kept one epoch (a resent rekey is encrypted under it)."""
    old = st["kek_epoch"]
    new = tree_epoch(st, tree)
    if new != old:
        if new < old:
            raise RuntimeError("LKH root version went backwards")
        st["kek_epoch"], st["kek_created"] = new, now
        st["keks"] = {old: st["keks"][old], new: tree.kek}
    return int(new)


def lkh_inner(st: dict[str, Any], msg: RekeyMessage) -> dict[str, Any]:
    """The rekey payload fields of one tree message (call after ``adopt_root``)."""
    return {"lkh": msg.encode(), "lkh_kek_epoch": st["kek_epoch"]}


class KeyTrees:
    """The cached trees of the key-tree levels (loaded lazily from the store)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._trees: dict[tuple[str, str], LKHTree] = {}

    def get(self, lc: LevelConfig) -> LKHTree | None:
        if lc.key_tree != "lkh":
            return None
        tree = self._trees.get(lc.key)
        if tree is None:
            d = self.store.get(tree_key(lc))
            if d is None:
                return None
            tree = LKHTree.from_dict(d)
            if tree.degree != lc.key_tree_degree:
                log.warning("%s/%s: key tree keeps degree %d (key_tree_degree %d applies to a new tree only)",
                            lc.group, lc.level or "-", tree.degree, lc.key_tree_degree)
            tree.backward_access_control = lc.backward_access_control
            self._trees[lc.key] = tree
        return tree

    def create(self, lc: LevelConfig, st: dict[str, Any], now: float) -> dict[str, Any]:
        """A new, empty tree for a level (its members join it when they register); the level's
        KEK moves to the tree's root at a fresh epoch. Returns the store puts (with ``st``'s
        caller committing the level state in the same commit)."""
        tree = LKHTree(lc.key_tree_degree, backward_access_control=lc.backward_access_control)
        st["lkh_base"] = st["kek_epoch"] + 1
        adopt_root(st, tree, now)
        self._trees[lc.key] = tree
        return self.puts(lc, tree)

    def puts(self, lc: LevelConfig, tree: LKHTree) -> dict[str, Any]:
        return {tree_key(lc): tree.to_dict()}

    def forget(self, lc: LevelConfig) -> None:
        """Drop the cached tree (a commit failed after the tree changed in memory): the next
        ``get`` reloads the durable one."""
        self.forget_key(lc.key)

    def forget_key(self, key: tuple[str, str]) -> None:
        """Also called when the level state is (re)loaded from the store (an HA follower drops
        a level another controller changed): every tree change commits the level state too."""
        self._trees.pop(key, None)
