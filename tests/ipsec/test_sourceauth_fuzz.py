"""hypothesis: malformed, truncated and mutated source-auth packets raise only typed errors,
and no mutation of a signed packet is ever accepted."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupsec.errors import BadPacket, PacketDropped
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sourceauth import SigningSealer, SourceVerifier, parse_trailer_untrusted, public_key_bytes

NOW = 5.0
KEY = os.urandom(20)
SK = Ed25519PrivateKey.generate()
MODES = ("sign", "sign-batched")


def params(sender_id: int | None = None) -> SAParams:
    return SAParams(spi=0x3000, protocol="esp", suite="aes-gcm-16-128", mode="tunnel", dst="239.9.9.9",
                    enc_key=KEY, sender_id_bits=4, sender_id=sender_id)


def verifier(mode: str) -> SourceVerifier:
    return SourceVerifier(SecurityAssociation(params(), "in", NOW), {3: public_key_bytes(SK)}, mode)


def genuine(mode: str, n: int = 7) -> list[bytes]:
    s = SigningSealer(SecurityAssociation(params(3), "out", NOW), SK, mode, max_packets=n)
    out = [p for i in range(n) for p in s.seal_esp(4, b"payload %d" % i, NOW)]
    return out + s.flush()


GENUINE = {m: genuine(m) for m in MODES}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("mode", MODES)
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_raise_only_typed_errors(mode: str, data: bytes) -> None:
    with pytest.raises(PacketDropped):
        verifier(mode).open_esp_untrusted(data, NOW)


@pytest.mark.parametrize("mode", MODES)
@FUZZ
@given(data=st.binary(max_size=600))
def test_trailer_parser_raises_only_bad_packet(mode: str, data: bytes) -> None:
    try:
        p, _fields = parse_trailer_untrusted(data, mode)
    except BadPacket:
        return
    assert len(p) >= 8


@pytest.mark.parametrize("mode", MODES)
@FUZZ
@given(which=st.integers(0, 6), pos=st.integers(0, 10_000), xor=st.integers(1, 255))
def test_no_single_byte_change_is_accepted(mode: str, which: int, pos: int, xor: int) -> None:
    pkt = bytearray(GENUINE[mode][which])
    pkt[pos % len(pkt)] ^= xor
    with pytest.raises(PacketDropped):
        verifier(mode).open_esp_untrusted(bytes(pkt), NOW)


@pytest.mark.parametrize("mode", MODES)
@FUZZ
@given(which=st.integers(0, 6), cut=st.integers(0, 10_000), tail=st.binary(max_size=40))
def test_truncated_or_extended_packets_are_refused(mode: str, which: int, cut: int, tail: bytes) -> None:
    pkt = GENUINE[mode][which]
    mutated = pkt[:cut % len(pkt)] + tail
    if mutated == pkt:
        return
    with pytest.raises(PacketDropped):
        verifier(mode).open_esp_untrusted(mutated, NOW)


@FUZZ
@given(order=st.permutations(range(7)), which=st.integers(0, 6), pos=st.integers(0, 10_000),
       xor=st.integers(1, 255))
def test_batched_cache_never_accepts_a_changed_payload(order: list[int], which: int, pos: int, xor: int) -> None:
    """With the window cached, a trailer byte a receiver no longer needs may go unchecked, but
    the protected packet P itself is never accepted changed."""
    rx = verifier("sign-batched")
    pkts = GENUINE["sign-batched"]
    victim = bytearray(pkts[which])
    victim[pos % len(victim)] ^= xor
    for i in order:
        if i == which:
            continue
        assert rx.open_esp_untrusted(pkts[i], NOW)[1] == b"payload %d" % i
    try:
        _nh, payload, _sid = rx.open_esp_untrusted(bytes(victim), NOW)
    except PacketDropped:
        return
    p_len = len(parse_trailer_untrusted(pkts[which], "sign-batched")[0])
    assert pos % len(victim) >= p_len  # only a trailer byte changed ...
    assert payload == b"payload %d" % which  # ... and the payload is the signed one
