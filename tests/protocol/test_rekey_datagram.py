"""Rekey datagrams: sign, encrypt, fragment, and every rejection reason."""

from __future__ import annotations

import os

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from groupsec.errors import BadRekey
from groupsec.ipsec.params import SAParams
from groupsec.protocol.messages import SAGrant
from groupsec.protocol.rekey import (
    Reassembler,
    build_heartbeat_datagrams,
    build_rekey_datagrams,
    open_rekey_untrusted,
)

SK = Ed25519PrivateKey.generate()
PK = SK.public_key()
KEK = os.urandom(32)


def _sa(spi: int) -> SAParams:
    return SAParams(spi=spi, protocol="esp", suite="aes-gcm-16-128", mode="tunnel", dst="239.1.1.1",
                    enc_key=os.urandom(20), sender_id_bits=8)


def _grant(spi: int) -> SAGrant:
    return SAGrant(_sa(spi), "in", 100.0, None)


def test_roundtrip_carries_sas_kek_and_header():
    new_kek = os.urandom(32)
    inner = {"sas": [_grant(0x1234).to_wire()], "remove": [0x1000], "kek": {"epoch": 4, "key": new_kek},
             "revoked_senders": [3]}
    [dg] = build_rekey_datagrams(SK, 3, KEK, "video", "hd", 7, "rekey", inner, now=50.0)
    msg = open_rekey_untrusted(dg, [PK], {3: KEK})
    assert (msg.group, msg.level, msg.msg_id, msg.kind, msg.kek_epoch, msg.time) == ("video", "hd", 7, "rekey", 3, 50.0)
    assert msg.sas[0].params.spi == 0x1234
    assert msg.sas[0].params.enc_key == inner["sas"][0]["params"]["enc_key"]
    assert msg.remove == (0x1000,)
    assert msg.revoked_senders == (3,)
    assert (msg.new_kek_epoch, msg.new_kek) == (4, new_kek)
    assert new_kek not in dg
    assert inner["sas"][0]["params"]["enc_key"] not in dg
    assert new_kek.hex() not in repr(msg)


def test_bad_signature_rejected():
    [dg] = build_rekey_datagrams(SK, 1, KEK, "g", "", 1, "rekey", {}, now=0.0)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(BadRekey) as ei:
        open_rekey_untrusted(dg, [other.public_key()], {1: KEK})
    assert ei.value.reason == "bad-signature"
    # forged: a valid datagram signed by someone else
    [forged] = build_rekey_datagrams(other, 1, KEK, "g", "", 2, "rekey", {}, now=0.0)
    with pytest.raises(BadRekey) as ei:
        open_rekey_untrusted(forged, [PK], {1: KEK})
    assert ei.value.reason == "bad-signature"


def test_tampered_header_byte_rejected():
    [dg] = build_rekey_datagrams(SK, 1, KEK, "g", "", 1, "rekey", {"remove": [300]}, now=0.0)
    outer = msgpack.unpackb(dg)
    hb = bytearray(outer[1])
    hb[-1] ^= 1
    bad = msgpack.packb([1, bytes(hb), outer[2]])
    with pytest.raises(BadRekey) as ei:
        open_rekey_untrusted(bad, [PK], {1: KEK})
    assert ei.value.reason == "bad-signature"


def test_unknown_kek_and_wrong_kek():
    [dg] = build_rekey_datagrams(SK, 5, KEK, "g", "", 1, "rekey", {}, now=0.0)
    with pytest.raises(BadRekey) as ei:
        open_rekey_untrusted(dg, [PK], {4: KEK})
    assert ei.value.reason == "unknown-kek"
    with pytest.raises(BadRekey) as ei:
        open_rekey_untrusted(dg, [PK], {5: os.urandom(32)})
    assert ei.value.reason == "undecryptable"


def test_wrong_group():
    [dg] = build_rekey_datagrams(SK, 1, KEK, "audio", "", 1, "rekey", {}, now=0.0)
    with pytest.raises(BadRekey) as ei:
        open_rekey_untrusted(dg, [PK], {1: KEK}, expect_group="video")
    assert ei.value.reason == "wrong-group"
    assert open_rekey_untrusted(dg, [PK], {1: KEK}, expect_group="audio").group == "audio"


def test_bad_version():
    [dg] = build_rekey_datagrams(SK, 1, KEK, "g", "", 1, "rekey", {}, now=0.0)
    outer = msgpack.unpackb(dg)
    with pytest.raises(BadRekey) as ei:
        open_rekey_untrusted(msgpack.packb([2, outer[1], outer[2]]), [PK], {1: KEK})
    assert ei.value.reason == "bad-version"


def test_fragmented_message_reassembles_in_any_order():
    inner = {"sas": [_grant(0x2000 + i).to_wire() for i in range(40)]}
    dgs = build_rekey_datagrams(SK, 1, KEK, "g", "sd", 9, "rekey", inner, now=0.0, mtu=1200)
    assert len(dgs) > 2
    assert all(len(d) <= 1200 for d in dgs)
    r = Reassembler()
    out = [r.feed_untrusted(d, [PK], {1: KEK}, now=1.0) for d in reversed(dgs)]
    assert out[:-1] == [None] * (len(dgs) - 1)
    whole = out[-1]
    assert whole is not None
    assert whole.frag is None
    assert [g.params.spi for g in whole.sas] == [0x2000 + i for i in range(40)]
    assert r.pending == 0


def test_reassembler_is_bounded_and_expires():
    inner = {"sas": [_grant(0x3000 + i).to_wire() for i in range(20)]}
    r = Reassembler(max_pending=2, timeout=5.0)
    for mid in (1, 2, 3):
        dgs = build_rekey_datagrams(SK, 1, KEK, "g", "", mid, "rekey", inner, now=0.0)
        assert r.feed_untrusted(dgs[0], [PK], {1: KEK}, now=0.0) is None
    assert r.pending == 2
    assert r.dropped == 1
    r.expire(now=10.0)
    assert r.pending == 0
    assert r.dropped == 3


def test_heartbeat_carries_latest_msg_id():
    [dg] = build_heartbeat_datagrams(SK, 2, KEK, "g", "", 42, now=3.0)
    msg = open_rekey_untrusted(dg, [PK], {2: KEK})
    assert (msg.kind, msg.msg_id, msg.sas) == ("heartbeat", 42, ())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_badrekey(data):
    try:
        open_rekey_untrusted(data, [PK], {1: KEK})
    except BadRekey:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_bitflips_never_accepted(pos, bit):
    [dg] = build_rekey_datagrams(SK, 1, KEK, "g", "", 1, "rekey", {"remove": [999]}, now=0.0)
    b = bytearray(dg)
    b[pos % len(b)] ^= (bit % 255) + 1
    with pytest.raises(BadRekey):
        open_rekey_untrusted(bytes(b), [PK], {1: KEK})
