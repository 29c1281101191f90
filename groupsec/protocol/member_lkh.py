"""The member side of key-tree (LKH) group levels, used by groupsec.protocol.member (pure).

A grant for a key-tree level carries the member's path keys in ``extra["lkh_path"]``
(``MemberPath.encode()``, leaf first, root last; the root key IS the granted KEK). A tree
rekey is an ordinary signed rekey datagram whose payload holds ``"lkh"`` (the tree's
``RekeyMessage.encode()``) and ``"lkh_kek_epoch"`` (the KEK epoch of the root key after it);
it is encrypted under the KEK members held before it. See docs/PROTOCOL.md s9.

Outcomes of :func:`apply_tree_update` (``BadRekey.reason``):
  - ``lkh-stale``: an epoch this member already has (its path came from a newer grant): ignore.
  - ``lkh-gap``: a tree message was missed: resync (the ResyncReply grant has a fresh path).
  - ``lkh-cannot-derive``: the new KEK is not reachable from this member's keys: it was
    evicted (or its keys are out of sync): stop using the tree, resync once (refused if evicted).
  - ``unwrap-failed`` / ``malformed``: a bad message under a valid signature: resync.
"""

from __future__ import annotations

from typing import Any

from groupsec.errors import BadRekey
from groupsec.keys.lkh import MemberKeyState, MemberPath, RekeyMessage

__all__ = ["apply_tree_update", "has_tree_update", "tree_from_grant"]


def tree_from_grant(extra: dict[str, Any], kek: bytes) -> MemberKeyState | None:
    """The member's LKH state from a grant's ``extra`` (None: not a key-tree level). Raises
    ``BadRekey`` (reason ``malformed`` or ``lkh-mismatch``) for a path we cannot use."""
    raw = extra.get("lkh_path")
    if raw is None:
        return None
    path = MemberPath.decode_untrusted(raw)
    if path.kek != kek:
        raise BadRekey("the granted LKH path does not end at the granted KEK", "lkh-mismatch")
    return MemberKeyState(path)


def has_tree_update(extra: dict[str, Any]) -> bool:
    return "lkh" in extra


def apply_tree_update(state: MemberKeyState, extra: dict[str, Any]) -> tuple[int, bytes] | None:
    """Apply the tree message of a rekey payload (all or nothing). Returns ``(kek_epoch, kek)``
    when the root key changed, None when it did not (a leaf split). Raises ``BadRekey``."""
    raw, epoch = extra.get("lkh"), extra.get("lkh_kek_epoch")
    if not isinstance(raw, bytes) or type(epoch) is not int or epoch < 0:
        raise BadRekey("a tree rekey needs lkh (bytes) and lkh_kek_epoch (int)", "malformed")
    msg = RekeyMessage.decode_untrusted(raw)
    before = state.kek_version
    kek = state.apply_rekey(msg)
    return (epoch, kek) if state.kek_version != before else None
