"""A group simulation for the LKH tests: a controller tree plus every member's own state,
with every key each member ever held and every message ever sent recorded."""

from __future__ import annotations

import pytest

from groupsec.errors import BadRekey
from groupsec.keys.lkh import LKHTree, MemberKeyState, MemberPath, RekeyMessage, Wrap
from groupsec.keys.wrap import unwrap_key


def opens(key: bytes, w: Wrap) -> bool:
    """Does ``key`` open wrap ``w``? (An attacker uses the public labels with its own key.)"""
    try:
        unwrap_key(key, w.wrapped, w.target_id, w.target_version, w.wrapping_id, w.wrapping_version)
    except BadRekey:
        return False
    return True


class Group:
    def __init__(self, degree: int, bac: bool, initial: int = 0) -> None:
        names = [f"i{k}" for k in range(initial)]
        self.tree = LKHTree.bulk(names, degree, backward_access_control=bac)
        self.states: dict[str, MemberKeyState] = {}
        self.held: dict[str, set[bytes]] = {}        # every key bytes a member ever held
        self.messages: list[RekeyMessage] = []
        self.evicted_at: dict[str, int] = {}         # name -> index of its eviction message
        self.joined_at: dict[str, int] = {}          # name -> number of messages sent before it joined
        self.counter = 0
        for n in names:
            self._admit(n, self.tree.path_for(n))

    def _admit(self, name: str, path: MemberPath) -> None:
        path = MemberPath.decode_untrusted(path.encode())  # it crosses TLS as bytes
        self.states[name] = MemberKeyState(path)
        self.held[name] = {k.key for k in path.keys}
        self.joined_at[name] = len(self.messages)

    def all_held(self) -> set[bytes]:
        return set().union(*self.held.values()) if self.held else set()

    def retired(self) -> set[bytes]:
        return set().union(*(self.held[n] for n in self.evicted_at)) if self.evicted_at else set()

    def deliver(self, msg: RekeyMessage, to: list[str]) -> None:
        wire = RekeyMessage.decode_untrusted(msg.encode())
        assert wire == msg
        labels_known: set[tuple[int, int]] = set()
        for name in to:
            st = self.states[name]
            labels_known |= {(k.node_id, k.version) for k in st.keys}
            assert st.apply_rekey(wire) == self.tree.kek
            labels_known |= {(k.node_id, k.version) for k in st.keys}
            self.held[name] |= {k.key for k in st.keys}
        # no dead wraps: each one is under a key some legitimate recipient holds
        assert all((w.wrapping_id, w.wrapping_version) in labels_known for w in msg.wraps)
        self.messages.append(msg)

    def join(self) -> str:
        name = f"j{self.counter}"
        self.counter += 1
        before = self.all_held()
        res = self.tree.join(name)
        assert res.rekey is None or res.rekey.wraps  # a rekey is sent only when it carries keys
        if res.rekey is not None:
            self.deliver(res.rekey, sorted(self.states))
        self._admit(name, res.path)
        if self.tree.backward_access_control:
            # the newcomer was handed only keys nobody held before it joined ...
            assert not (self.held[name] & before)
            # ... so it opens no wrap sent before it joined
            for m in self.messages[: self.joined_at[name]]:
                assert not any(opens(k, w) for w in m.wraps for k in self.held[name])
        return name

    def evict(self, names: list[str]) -> RekeyMessage:
        msg = self.tree.evict(names)
        for n in names:
            st = self.states.pop(n)
            epoch = st.epoch
            with pytest.raises(BadRekey) as exc:
                st.apply_rekey(msg)
            assert exc.value.reason == "lkh-cannot-derive"
            assert st.epoch == epoch  # all or nothing
            self.evicted_at[n] = len(self.messages)
        self.deliver(msg, sorted(self.states))
        return msg

    def check(self) -> None:
        """Invariants that hold after every step."""
        tree = self.tree
        assert set(self.states) == set(tree.members())
        for name, st in self.states.items():
            assert st.kek == tree.kek
            assert st.epoch == tree.epoch
            # a member holds exactly its path: no stale keys are kept
            path = tree.path_for(name)
            assert {(k.node_id, k.version, k.key) for k in st.keys} == {(k.node_id, k.version, k.key)
                                                                         for k in path.keys}
        assert tree.depth() <= tree.depth_bound()
        retired = self.retired()
        assert tree.kek not in retired
        for st in self.states.values():  # no key an evicted member held is still in use
            assert not ({k.key for k in st.keys} & retired)

    def check_collusion(self) -> int:
        """Every wrap sent at or after an eviction is tried with every key of every member
        evicted by then, pooled. Returns the number of attempts."""
        attempts = 0
        for i, msg in enumerate(self.messages):
            pool = set().union(*(self.held[n] for n, at in self.evicted_at.items() if at <= i), set())
            for w in msg.wraps:
                for k in pool:
                    attempts += 1
                    assert not opens(k, w), f"a key of an evicted member opens wrap {w} of message {i}"
        # the strong closure form: everything the whole coalition knows, against everything
        # sent after the last of them was evicted, opening whatever opens until nothing does
        if self.evicted_at:
            last = max(self.evicted_at.values())
            pool = self.retired()
            later = [w for m in self.messages[last:] for w in m.wraps]
            grew = True
            while grew:
                grew = False
                for w in later:
                    for k in list(pool):
                        if opens(k, w):
                            new = unwrap_key(k, w.wrapped, w.target_id, w.target_version, w.wrapping_id,
                                             w.wrapping_version)
                            grew = grew or new not in pool
                            pool.add(new)
            assert pool == self.retired()
        return attempts
