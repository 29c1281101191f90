"""LKH key tree: property tests over random joins, evictions and batch evictions."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lkh_sim import Group, opens

from groupsec.errors import BadRekey, ConfigError, LocalProtocolError
from groupsec.keys.lkh import ROOT_ID, LKHTree, MemberKeyState, RekeyMessage, ceil_log

OPS = st.lists(
    st.one_of(
        st.just(("join", [])),
        st.tuples(st.just("evict"), st.lists(st.integers(0, 10_000), min_size=1, max_size=1)),
        st.tuples(st.just("evict"), st.lists(st.integers(0, 10_000), min_size=2, max_size=5)),
    ),
    min_size=3,
    max_size=40,
)


def _run(group: Group, ops: list[tuple[str, list[int]]]) -> None:
    group.check()
    for op, picks in ops:
        current = sorted(group.states)
        if op == "join" or not current:
            group.join()
        else:
            group.evict(sorted({current[p % len(current)] for p in picks}))
        group.check()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(degree=st.integers(2, 5), bac=st.booleans(), initial=st.integers(0, 12), ops=OPS)
def test_members_follow_and_evicted_coalitions_learn_nothing(degree: int, bac: bool, initial: int,
                                                            ops: list[tuple[str, list[int]]]) -> None:
    group = Group(degree, bac, initial)
    _run(group, ops)
    group.check_collusion()


@pytest.mark.parametrize(("degree", "bac", "seed"), [(2, False, 1), (3, True, 2), (4, False, 3), (5, True, 4)])
def test_long_random_walk(degree: int, bac: bool, seed: int) -> None:
    """A longer walk than hypothesis likes to generate: 120 steps around 40 members."""
    rng = random.Random(seed)
    group = Group(degree, bac, 40)
    for _ in range(120):
        current = sorted(group.states)
        if len(current) < 25 or rng.random() < 0.5:
            group.join()
        else:
            group.evict(rng.sample(current, rng.choice([1, 1, 1, 2, 3, 6])))
        group.check()
    assert len(group.evicted_at) > 30
    group.check_collusion()


def test_collusion_check_is_not_vacuous() -> None:
    # many evictions, batches included, so the pooled check really tries thousands of keys
    group = Group(3, False, 30)
    for i in range(12):
        current = sorted(group.states)
        group.evict(current[i % len(current):][:1 + i % 3])
        group.join()
        group.check()
    assert group.check_collusion() > 2000
    # and the checker does detect a key that opens: a current member opens the last message
    member = sorted(group.states)[0]
    last = group.messages[-1]
    assert any(opens(k, w) for w in last.wraps for k in group.held[member])


def test_without_backward_access_control_a_newcomer_reads_the_past() -> None:
    """The control for the backward-access test in Group.join: without the option, the
    newcomer's keys do open a wrap sent before it joined."""
    group = Group(3, False, 9)
    group.evict(["i0"])
    name = group.join()
    earlier = [w for m in group.messages[: group.joined_at[name]] for w in m.wraps]
    assert any(opens(k, w) for w in earlier for k in group.held[name])
    group2 = Group(3, True, 9)
    group2.evict(["i0"])
    group2.join()  # asserts that it opens nothing from before


def test_batch_eviction_shares_ancestors() -> None:
    tree = LKHTree.bulk([f"m{i}" for i in range(81)], 3)
    singles = sum(len(LKHTree.from_dict(tree.to_dict()).evict([m]).wraps) for m in ("m0", "m1"))
    batch = tree.evict(["m0", "m1"])
    assert len(batch.wraps) < singles
    assert len(batch.targets) == len(set(batch.targets))  # each new key once
    assert batch.targets[-1] == ROOT_ID  # bottom-up: the KEK comes last


@settings(max_examples=80, deadline=None)
@given(degree=st.integers(2, 6), steps=st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 99)),
                                                max_size=30))
def test_tree_stays_balanced(degree: int, steps: list[tuple[bool, int, int]]) -> None:
    """depth <= max(1, ceil(log_d N)) + 1 after every operation; joins alone never exceed
    max(1, ceil(log_d N)); the persisted form stays consistent (from_dict validates it)."""
    tree = LKHTree(degree)
    grown_only = True
    serial = 0
    for is_join, count, seed in steps:
        if is_join or len(tree) == 0:
            for _ in range(count):
                tree.join(f"m{serial}")
                serial += 1
        else:
            grown_only = False
            members = tree.members()
            tree.evict([members[(seed + 7 * k) % len(members)] for k in range(min(count, len(members)))])
        n = len(tree)
        assert tree.depth() <= max(1, ceil_log(n, degree)) + 1
        if grown_only:
            assert tree.depth() <= max(1, ceil_log(n, degree))
        d = tree.to_dict()
        children: dict[int, int] = {}
        for _nid, _v, _k, parent, _m in d["nodes"]:
            children[parent] = children.get(parent, 0) + 1
        internal = [nid for nid, _v, _k, _p, m in d["nodes"] if m is None and nid != ROOT_ID]
        assert all(children.get(nid, 0) >= 2 for nid in internal)  # no one-child chains
        LKHTree.from_dict(d)


def test_single_eviction_cost_is_logarithmic() -> None:
    for degree in (2, 3, 4):
        for n in (10, 100, 1000, 5000):
            tree = LKHTree.bulk([f"m{i}" for i in range(n)], degree)
            depth = tree.depth()
            assert depth == max(1, ceil_log(n, degree))
            msg = tree.evict([tree.deepest_member()])  # type: ignore[list-item]
            assert len(msg.wraps) <= (degree - 1) + degree * (depth - 1)
            assert len(msg.targets) <= depth


def test_persistence_round_trip() -> None:
    group = Group(3, True, 20)
    group.evict(["i3", "i4"])
    group.join()
    tree = group.tree
    stored = msgpack.unpackb(msgpack.packb(tree.to_dict(), use_bin_type=True), raw=False)
    restored = LKHTree.from_dict(stored)
    assert restored.kek == tree.kek
    assert restored.epoch == tree.epoch
    assert sorted(restored.members()) == sorted(tree.members())
    assert restored.degree == 3
    assert restored.backward_access_control
    for m in tree.members():
        assert restored.path_for(m) == tree.path_for(m)
    # the members' existing states follow the restored tree
    group.tree = restored
    group.evict(["i7"])
    group.join()
    group.check()
    group.check_collusion()


def test_restore_refuses_inconsistent_state() -> None:
    good = LKHTree.bulk([f"m{i}" for i in range(10)], 3).to_dict()
    bad_cases = []
    for mutate in (
        lambda d: d["nodes"].pop(3),                          # orphans the children of a node
        lambda d: d["nodes"][4].__setitem__(2, b"short"),      # key length
        lambda d: d["nodes"][4].__setitem__(3, 4),            # its own parent
        lambda d: d["nodes"][0].__setitem__(3, 5),            # root with a parent
        lambda d: d.__setitem__("degree", 1),
        lambda d: d.__setitem__("format", 2),
        lambda d: d["nodes"].append([d["next_id"], 0, bytes(32), 0, "m1"]),  # duplicate member / bad id
        lambda d: d.pop("epoch"),
    ):
        d = msgpack.unpackb(msgpack.packb(good, use_bin_type=True), raw=False)
        mutate(d)
        bad_cases.append(d)
    for d in bad_cases:
        with pytest.raises(ConfigError):
            LKHTree.from_dict(d)


def test_api_misuse_is_a_local_error() -> None:
    tree = LKHTree(3)
    tree.join("a")
    with pytest.raises(LocalProtocolError):
        tree.join("a")
    with pytest.raises(LocalProtocolError):
        tree.evict(["nobody"])
    with pytest.raises(LocalProtocolError):
        tree.evict([])
    with pytest.raises(ConfigError):
        LKHTree(1)


def test_member_gap_stale_and_resync() -> None:
    tree = LKHTree.bulk([f"m{i}" for i in range(20)], 3)
    a = MemberKeyState(tree.path_for("m5"))
    m1 = tree.evict(["m0"])
    m2 = tree.evict(["m1"])
    with pytest.raises(BadRekey) as exc:
        a.apply_rekey(m2)
    assert exc.value.reason == "lkh-gap"
    a.apply_rekey(m1)
    with pytest.raises(BadRekey) as exc:
        a.apply_rekey(m1)
    assert exc.value.reason == "lkh-stale"
    tree.evict(["m2"])  # lost
    a.reset(tree.path_for("m5"))  # resync over TLS
    assert a.kek == tree.kek
    assert a.apply_rekey(tree.evict(["m3"])) == tree.kek
    restored = MemberKeyState.from_dict(msgpack.unpackb(msgpack.packb(a.to_dict()), raw=False))
    assert restored.kek == a.kek
    assert restored.epoch == a.epoch
    assert restored.apply_rekey(tree.evict(["m4"])) == tree.kek


def test_tampered_wrap_is_refused_and_state_kept() -> None:
    tree = LKHTree.bulk([f"m{i}" for i in range(9)], 3)
    a = MemberKeyState(tree.path_for("m8"))
    kek, epoch = a.kek, a.epoch
    msg = tree.evict(["m0"])
    wire = msg.to_wire()
    for block in wire[2]:
        block[2] = bytes(b ^ 1 for b in block[2])
    with pytest.raises(BadRekey) as exc:
        a.apply_rekey(RekeyMessage.from_wire_untrusted(wire))
    assert exc.value.reason == "unwrap-failed"
    assert (a.kek, a.epoch) == (kek, epoch)
    assert a.apply_rekey(msg) == tree.kek


def test_everyone_evicted() -> None:
    tree = LKHTree.bulk(["a", "b"], 3)
    a = MemberKeyState(tree.path_for("a"))
    msg = tree.evict(["a", "b"])
    with pytest.raises(BadRekey):
        a.apply_rekey(msg)
    assert len(tree) == 0
    assert tree.depth() == 0
    res = tree.join("c")
    assert MemberKeyState(res.path).kek == tree.kek


def test_reprs_hide_keys() -> None:
    group = Group(3, True, 5)
    group.evict(["i0"])
    tree = group.tree
    path = tree.path_for("i1")
    secrets = [k.key for k in path.keys] + [w.wrapped for m in group.messages for w in m.wraps]
    texts = [repr(tree), repr(path), repr(path.keys[0]), repr(group.states["i1"]), repr(group.messages[0]),
             str(group.messages[0].wraps[0])]
    for text in texts:
        for s in secrets:
            assert repr(s)[2:-1][:16] not in text
            assert s.hex()[:16] not in text


def test_eviction_rebalances_a_caterpillar() -> None:
    """Keep m0, m1, m2, m4, m8, m16, m32 of a full binary tree of 64: splicing alone leaves a
    caterpillar of depth 6 for 7 members; the eviction must move members up (bound 4)."""
    group = Group(2, False, 64)
    keep = {f"i{k}" for k in (0, 1, 2, 4, 8, 16, 32)}
    assert group.tree.depth() == 6
    group.evict(sorted(set(group.states) - keep))
    group.check()
    assert group.tree.depth() <= group.tree.depth_bound() == 4  # splicing alone would leave 6
    group.check_collusion()
    for _ in range(5):
        group.join()
        group.check()
