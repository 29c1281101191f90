"""LKH wire formats and key wrap: untrusted input raises only typed errors; the bytes on
the wire are what the format says; an LKH rekey survives the real signed rekey datagrams."""

from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from groupsec.errors import BadRekey
from groupsec.keys.lkh import LKHTree, MemberKeyState, MemberPath, RekeyMessage
from groupsec.keys.wrap import WRAPPED_LEN, new_key, unwrap_key, wrap_key
from groupsec.protocol.rekey import Reassembler, build_rekey_datagrams, open_rekey_untrusted


def _sample() -> tuple[LKHTree, RekeyMessage]:
    tree = LKHTree.bulk([f"m{i}" for i in range(30)], 3)
    return tree, tree.evict(["m0", "m7"])


def _sample_with_path() -> tuple[MemberPath, RekeyMessage]:
    tree = LKHTree.bulk([f"m{i}" for i in range(30)], 3)
    path = tree.path_for("m5")  # before the eviction: the member's state when the rekey arrives
    return path, tree.evict(["m0", "m7"])


_PATH, _MSG = _sample_with_path()


def test_wrap_is_bound_to_key_and_every_label() -> None:
    k, target = new_key(), new_key()
    labels = (5, 9, 17, 3)
    w = wrap_key(k, target, *labels)
    assert len(w) == WRAPPED_LEN
    assert unwrap_key(k, w, *labels) == target
    for i in range(4):
        moved = list(labels)
        moved[i] += 1
        with pytest.raises(BadRekey):
            unwrap_key(k, w, *moved)
    with pytest.raises(BadRekey):
        unwrap_key(new_key(), w, *labels)
    with pytest.raises(BadRekey):
        unwrap_key(k, w[:-1], *labels)
    assert wrap_key(k, target, *labels) == w  # AES-KW is deterministic; keys are never re-wrapped


def test_encoding_layout() -> None:
    _tree, msg = _sample()
    obj = msgpack.unpackb(msg.encode(), raw=False)
    version, epoch, blocks, removed = obj
    assert (version, epoch) == (1, msg.epoch)
    assert [b[0] for b in blocks] == list(msg.targets)
    assert sum(len(b[1]) // 2 for b in blocks) == len(msg.wraps)
    assert all(len(b[2]) == WRAPPED_LEN * len(b[1]) // 2 for b in blocks)
    assert set(removed) == set(msg.removed)
    assert len(removed) >= 2
    # per wrap on the wire: two small ints and 40 bytes; nothing else grows with the wrap count
    assert len(msg.encode()) < len(msg.wraps) * (WRAPPED_LEN + 10) + len(blocks) * 12 + 64


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_bad_rekey(data: bytes) -> None:
    for parse in (RekeyMessage.decode_untrusted, MemberPath.decode_untrusted):
        try:
            parse(data)
        except BadRekey:
            pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.binary(max_size=48)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_values, min_size=0, max_size=5), st.integers(0, 3))
def test_random_structures_raise_only_bad_rekey(items: list[object], head: int) -> None:
    obj = [1, *items] if head else items
    for parse in (RekeyMessage.from_wire_untrusted, MemberPath.from_wire_untrusted):
        try:
            parse(obj)
        except BadRekey:
            pass
    try:
        RekeyMessage.decode_untrusted(msgpack.packb(obj, use_bin_type=True))
    except BadRekey:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_messages_raise_only_bad_rekey(data: st.DataObject) -> None:
    good = data.draw(st.sampled_from([_MSG.encode(), _PATH.encode()]))
    pos = data.draw(st.integers(0, len(good) - 1))
    how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if how == "flip":
        bad = good[:pos] + bytes([good[pos] ^ data.draw(st.integers(1, 255))]) + good[pos + 1:]
    elif how == "cut":
        bad = good[:pos]
    else:
        bad = good[:pos] + data.draw(st.binary(min_size=1, max_size=4)) + good[pos:]
    for parse in (RekeyMessage.decode_untrusted, MemberPath.decode_untrusted):
        try:
            parsed = parse(bad)
        except BadRekey:
            continue
        if isinstance(parsed, RekeyMessage):  # it parsed: a member must still refuse or follow it
            member = MemberKeyState(_PATH)
            try:
                member.apply_rekey(parsed)
            except BadRekey:
                assert member.epoch == _PATH.epoch


def test_decoder_bounds_and_semantics() -> None:
    _tree, msg = _sample()
    wire = msg.to_wire()
    cases = [
        [2, *wire[1:]],                                   # unknown format
        [1, 0, wire[2], []],                              # epoch 0
        [1, msg.epoch, [wire[2][0], wire[2][0]], []],     # a target twice
        [1, msg.epoch, [[wire[2][0][0], [7, msg.epoch + 1], bytes(40)]], []],  # wrap under a future key
        [1, msg.epoch, [[7, [7, msg.epoch], bytes(40)]], []],                 # a key wrapped under itself
        [1, msg.epoch, [[wire[2][0][0], [7], bytes(40)]], []],               # odd label list
        [1, msg.epoch, [[wire[2][0][0], [7, 0], bytes(39)]], []],            # short wrap
        [1, msg.epoch, [[True, [7, 0], bytes(40)]], []],                     # bool is not an id
        [1, msg.epoch, [[-1, [7, 0], bytes(40)]], []],
        [1, msg.epoch, wire[2], [2**64 - 1]],               # id beyond 2**63 - 1
    ]
    for case in cases:
        with pytest.raises(BadRekey):
            RekeyMessage.decode_untrusted(msgpack.packb(case, use_bin_type=True))
    assert RekeyMessage.decode_untrusted(msgpack.packb(wire, use_bin_type=True)) == msg
    with pytest.raises(BadRekey):
        RekeyMessage.decode_untrusted(b"\xc7\x01\x05x")  # an extension type
    with pytest.raises(BadRekey):
        RekeyMessage.decode_untrusted(b"\x00" * (5 * 1024 * 1024))


def test_lkh_rekey_through_signed_datagrams() -> None:
    """Controller to member through the real rekey datagrams (signed, encrypted under the
    current KEK, fragmented at 1200 bytes and reassembled)."""
    tree = LKHTree.bulk([f"m{i}" for i in range(3000)], 3)
    signer = Ed25519PrivateKey.generate()
    member = MemberKeyState(tree.path_for("m1234"))
    old_epoch, old_kek = tree.kek_version, tree.kek
    msg = tree.evict([tree.deepest_member(), "m17", "m2999"])  # type: ignore[list-item]
    datagrams = build_rekey_datagrams(signer, old_epoch, old_kek, "g", "default", 9, "lkh",
                                      {"lkh": msg.encode()}, 100.0)
    assert len(datagrams) > 1
    assert all(len(d) <= 1200 for d in datagrams)
    r = Reassembler()
    out = None
    for d in reversed(datagrams):
        out = r.add(open_rekey_untrusted(d, [signer.public_key()], {old_epoch: old_kek}), 100.0)
    assert out is not None
    assert out.kind == "lkh"
    assert member.apply_rekey(RekeyMessage.decode_untrusted(out.extra["lkh"])) == tree.kek
