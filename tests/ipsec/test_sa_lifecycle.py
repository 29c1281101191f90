"""Lifetimes, sequence exhaustion, sender IDs, unsafe configurations, SAD and SPD."""

from __future__ import annotations

import os

import pytest
from ipsec_helpers import V4, lifetime, make_params, pair

from groupsec.errors import (
    BadPacket,
    LocalProtocolError,
    PolicyError,
    PolicyViolation,
    ReplayDetected,
    SAExpired,
    UnknownSPI,
)
from groupsec.ipsec.ip import build_udp_packet, checksum, parse_ip_untrusted
from groupsec.ipsec.packet import protect, unprotect_untrusted
from groupsec.ipsec.params import SAParams, check_no_shared_counter_key
from groupsec.ipsec.sa import SEQ_MAX, RekeyNeeded, SAHardExpired, SecurityAssociation
from groupsec.ipsec.sad import SAD
from groupsec.ipsec.spd import SPD, Action, Selector, SPDEntry

# --- lifetimes ------------------------------------------------------------------------------


def test_packet_lifetimes_outbound_and_inbound() -> None:
    out, inb, _ = pair("aes-gcm-16-128", lifetime=lifetime(soft_packets=3, hard_packets=5))
    sealed = []
    for i in range(5):
        sealed.append(out.seal_esp(4, b"p", 0.0))
        assert out.pop_events() == ([RekeyNeeded(0x1000, "packets")] if i == 2 else [])
    with pytest.raises(SAExpired):
        out.seal_esp(4, b"p", 0.0)
    assert out.pop_events() == [SAHardExpired(0x1000, "packets")]
    assert out.statistics()["expired"] is True
    for i, esp in enumerate(sealed):
        inb.open_esp_untrusted(esp, 0.0)
        assert inb.pop_events() == ([RekeyNeeded(0x1000, "packets")] if i == 2 else [])
    extra = SecurityAssociation(out.params, "out", 0.0).seal_esp(4, b"p", 0.0)
    with pytest.raises(SAExpired):
        inb.open_esp_untrusted(extra, 0.0)
    assert inb.statistics()["drops"] == {"sa-expired": 1}


def test_byte_and_time_lifetimes() -> None:
    out, inb, _ = pair("chacha20-poly1305", now=100.0,
                       lifetime=lifetime(soft_bytes=100, hard_bytes=250, soft_seconds=10, hard_seconds=20))
    out.seal_esp(4, bytes(60), 101.0)
    assert out.pop_events() == []
    out.seal_esp(4, bytes(60), 102.0)
    assert out.pop_events() == [RekeyNeeded(0x1000, "bytes")]
    out.seal_esp(4, bytes(10), 111.0)
    assert out.pop_events() == [RekeyNeeded(0x1000, "seconds")]
    with pytest.raises(SAExpired):
        out.seal_esp(4, bytes(200), 112.0)  # would cross the hard byte limit
    esp = SecurityAssociation(out.params, "out", 100.0).seal_esp(4, b"x", 100.0)
    assert inb.open_esp_untrusted(esp, 119.9)[1] == b"x"
    with pytest.raises(SAExpired):
        inb.open_esp_untrusted(SecurityAssociation(out.params, "out", 100.0).seal_esp(4, b"y", 100.0), 120.0)


def test_sequence_number_never_wraps() -> None:
    out, inb, _ = pair("aes-gcm-16-128")
    near_end = SecurityAssociation(out.params, "out", 0.0, _test_next_seq=SEQ_MAX - 1)
    a = near_end.seal_esp(4, b"a", 0.0)
    b = near_end.seal_esp(4, b"b", 0.0)
    assert [int.from_bytes(x[4:8], "big") for x in (a, b)] == [SEQ_MAX - 1, SEQ_MAX]
    assert RekeyNeeded(0x1000, "sequence") in near_end.pop_events()
    with pytest.raises(SAExpired):
        near_end.seal_esp(4, b"c", 0.0)
    assert inb.open_esp_untrusted(b, 0.0)[1] == b"b"


def test_ah_lifetime_and_direction_misuse() -> None:
    out, inb, sad = pair("hmac-sha-256-128", "transport", lifetime=lifetime(hard_packets=1))
    pkt = build_udp_packet(*V4, 1, 2, b"z")
    unprotect_untrusted(sad, protect(out, pkt, 0.0), 0.0)
    with pytest.raises(SAExpired):
        protect(out, pkt, 0.0)
    with pytest.raises(LocalProtocolError):
        inb.seal_esp(4, b"", 0.0)
    esp_out, _, _ = pair("aes-gcm-16-128")
    with pytest.raises(LocalProtocolError):
        esp_out.open_esp_untrusted(esp_out.seal_esp(4, b"own packet", 0.0), 0.0)


# --- sender IDs (RFC 6054) --------------------------------------------------------------------


def test_two_senders_never_share_a_nonce() -> None:
    key = os.urandom(20)
    base = {"sender_id_bits": 8, "enc_key": key}
    s1 = SecurityAssociation(make_params("aes-gcm-16-128", sender_id=1, **base), "out", 0.0)
    s2 = SecurityAssociation(make_params("aes-gcm-16-128", sender_id=2, **base), "out", 0.0)
    rx = SecurityAssociation(make_params("aes-gcm-16-128", **base), "in", 0.0)
    nonces = set()
    for _ in range(200):
        for sender, sa in ((1, s1), (2, s2)):
            esp = sa.seal_esp(4, b"same payload", 0.0)
            iv = esp[8:16]
            assert iv[0] == sender  # the sender ID in the IV's top 8 bits
            assert int.from_bytes(iv[4:], "big") == int.from_bytes(esp[4:8], "big")  # seq in the low bits
            nonces.add(key[-4:] + iv)
            assert rx.open_esp_untrusted(esp, 0.0) == (4, b"same payload", sender)
    assert len(nonces) == 400  # equal sequence numbers, distinct nonces
    assert rx.statistics()["senders"] == 2  # one replay window per sender
    with pytest.raises(ReplayDetected):
        rx.open_esp_untrusted(esp, 0.0)


def test_restarted_sender_does_not_repeat_its_ivs() -> None:
    p = make_params("aes-gcm-16-128")
    first = SecurityAssociation(p, "out", 0.0).seal_esp(4, b"x", 0.0)
    again = SecurityAssociation(p, "out", 0.0).seal_esp(4, b"x", 0.0)
    assert first[4:8] == again[4:8]  # same sequence number ...
    assert first[8:16] != again[8:16]  # ... but not the same IV (random per-SA bits)


def test_sender_id_zero_on_the_wire_is_refused() -> None:
    base = {"sender_id_bits": 4, "enc_key": os.urandom(20)}
    rx = SecurityAssociation(make_params("aes-gcm-16-128", **base), "in", 0.0)
    plain = SecurityAssociation(make_params("aes-gcm-16-128", **base | {"sender_id_bits": 0}), "out", 0.0)
    esp = bytearray(plain.seal_esp(4, b"x", 0.0))
    esp[8] &= 0x0F
    with pytest.raises(BadPacket):
        rx.open_esp_untrusted(bytes(esp), 0.0)


# --- unsafe configurations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"replay_window": 0},
        {"replay_window": 5000},
        {"esn": True},
        {"suite": "aes-cbc-128-hmac-sha-256", "sender_id_bits": 8},
        {"sender_id": 1},
        {"suite": "aes-cbc-128-hmac-sha-256", "auth_key": b""},  # encryption-only ESP
        {"spi": 5},
    ],
)
def test_unsafe_configurations_refused(kw: dict[str, object]) -> None:
    suite = str(kw.pop("suite", "aes-gcm-16-128"))
    with pytest.raises(PolicyError):
        make_params(suite, **kw)


def test_one_key_for_two_counter_mode_sas_refused() -> None:
    key = os.urandom(20)
    a, b = make_params("aes-gcm-16-128", spi=0x200, enc_key=key), make_params("aes-gcm-16-128", spi=0x201, enc_key=key)
    with pytest.raises(PolicyError):
        check_no_shared_counter_key([a, b])
    check_no_shared_counter_key([a, make_params("aes-gcm-16-128", spi=0x202)])


def test_repr_shows_no_keys() -> None:
    p = make_params("aes-cbc-128-hmac-sha-256")
    text = repr(SecurityAssociation(p, "out", 0.0)) + repr(p)
    assert p.enc_key.hex() not in text
    assert p.auth_key.hex() not in text


# --- SAD -----------------------------------------------------------------------------------


def test_sad_source_specific_entry_wins() -> None:
    any_src = SecurityAssociation(make_params("aes-gcm-16-128", spi=0x300), "in", 0.0)
    one_src = SecurityAssociation(make_params("aes-gcm-16-128", spi=0x300, src="192.0.2.7"), "in", 0.0)
    sad = SAD()
    sad.add(any_src)
    sad.add(one_src)
    assert sad.lookup(0x300, V4[1], "192.0.2.7") is one_src
    assert sad.lookup(0x300, V4[1], "192.0.2.8") is any_src
    assert len(sad) == 2
    with pytest.raises(PolicyError):
        sad.add(SecurityAssociation(one_src.params, "in", 0.0))
    with pytest.raises(UnknownSPI):
        sad.lookup(0x301, V4[1])
    sad.remove(0x300, V4[1], "192.0.2.7")
    assert sad.lookup(0x300, V4[1], "192.0.2.7") is any_src
    assert sad.statistics()["drops"] == {"unknown-spi": 1}


def test_sad_lookup_normalizes_ipv6() -> None:
    sa = SecurityAssociation(make_params("aes-gcm-16-128", addrs=("2001:db8::1", "ff0e::1")), "in", 0.0)
    sad = SAD()
    sad.add(sa)
    assert sad.lookup(0x1000, "FF0E:0:0::0001") is sa


def test_unknown_spi_on_the_wire() -> None:
    out, _, _ = pair("aes-gcm-16-128")
    sad = SAD()
    with pytest.raises(UnknownSPI):
        unprotect_untrusted(sad, protect(out, build_udp_packet(*V4, 1, 2, b"q"), 0.0), 0.0)


def test_tunnel_inner_packet_must_match_the_sa() -> None:
    p = make_params("aes-gcm-16-128", "tunnel", src="192.0.2.1")
    rogue = SecurityAssociation(p, "out", 0.0)
    sad = SAD()
    sad.add(SecurityAssociation(p, "in", 0.0))
    inner = build_udp_packet("198.51.100.9", V4[1], 1, 2, b"spoofed inner source")
    outer = build_udp_packet(*V4, 1, 2, b"")[:20]
    esp = rogue.seal_esp(4, inner, 0.0)
    wire = bytearray(outer + esp)
    wire[9] = 50
    wire[2:4] = len(wire).to_bytes(2, "big")
    wire[10:12] = b"\x00\x00"
    wire[10:12] = checksum(wire[:20]).to_bytes(2, "big")
    with pytest.raises(PolicyViolation):
        unprotect_untrusted(sad, bytes(wire), 0.0)


def test_tunnel_address_preservation() -> None:
    out, _, _ = pair("aes-gcm-16-128", "tunnel")
    inner = build_udp_packet(*V4, 1, 2, b"abc", ttl=7, tos=0xB8)
    outer = parse_ip_untrusted(protect(out, inner, 0.0))
    assert (outer.src, outer.dst, outer.ttl, outer.proto) == (V4[0], V4[1], 7, 50)


# --- SPD -----------------------------------------------------------------------------------


def test_spd_fail_closed() -> None:
    spd = SPD()
    spd.add(SPDEntry(Selector("239.1.1.1", proto=17, dport=5000), Action.PROTECT, group="video"))
    spd.add(SPDEntry(Selector("239.1.1.1", src="192.0.2.99"), Action.BYPASS))
    spd.add(SPDEntry(Selector("239.1.1.1"), Action.DISCARD))
    spd.add(SPDEntry(Selector("ff0e::5", proto=17), Action.PROTECT))
    protected = parse_ip_untrusted(build_udp_packet("192.0.2.1", "239.1.1.1", 1, 5000, b"plaintext"))
    with pytest.raises(PolicyViolation):
        spd.check_plaintext(protected)
    other_port = parse_ip_untrusted(build_udp_packet("192.0.2.1", "239.1.1.1", 1, 5001, b"x"))
    with pytest.raises(PolicyViolation):
        spd.check_plaintext(other_port)  # falls through to DISCARD
    bypass = parse_ip_untrusted(build_udp_packet("192.0.2.99", "239.1.1.1", 1, 5001, b"x"))
    entry = spd.check_plaintext(bypass)
    assert entry is not None
    assert entry.action is Action.BYPASS
    unrelated = parse_ip_untrusted(build_udp_packet("192.0.2.1", "239.9.9.9", 1, 5000, b"x"))
    assert spd.check_plaintext(unrelated) is None
    v6 = parse_ip_untrusted(build_udp_packet("2001:db8::1", "ff0e::5", 1, 2, b"x"))
    with pytest.raises(PolicyViolation):
        spd.check_plaintext(v6)
    assert spd.statistics()["drops"] == {"unprotected": 2, "discard": 1}
    spd.remove_group("video")
    with pytest.raises(PolicyViolation):  # now the DISCARD entry catches it
        spd.check_plaintext(protected)


def test_selector_validation() -> None:
    with pytest.raises(PolicyError):
        Selector("not-an-address")
    with pytest.raises(PolicyError):
        Selector("239.1.1.1", dport=70000)
    assert Selector("FF0E::0:5").dst == "ff0e::5"


def test_params_round_trip() -> None:
    p = make_params("aes-gcm-16-128", lifetime=lifetime(soft_packets=1, hard_packets=2))
    assert SAParams.from_dict(p.to_dict()) == p
