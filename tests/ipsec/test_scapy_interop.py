"""Interop with scapy's independent IPsec implementation, both ways.

scapy 2.8 (scapy.layers.ipsec) supports every transform we implement: AES-GCM (16-byte ICV),
AES-NULL-GMAC, CHACHA20-POLY1305, AES-CBC, NULL, HMAC SHA2-256-128/384-192/512-256, for ESP
and AH, transport and tunnel, IPv4 and IPv6, and ESP-in-UDP. For IPv4 AH it pads the ICV to
32 bits (RFC 4302), not 64 bits like Linux, so both of our sender alignments are checked.
"""

from __future__ import annotations

import os

import pytest
from ipsec_helpers import V4, V6, make_params
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import AH, ESP, IPSecIntegrityError
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.packet import raw

from groupsec.errors import AuthenticationFailed
from groupsec.ipsec.ip import build_udp_packet, parse_ip_untrusted
from groupsec.ipsec.packet import protect, unprotect_untrusted
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sad import SAD
from groupsec.ipsec.suites import AH_SUITES, ESP_SUITES

SCAPY_CRYPT = {
    "aead": {"aes-gcm-16-128": "AES-GCM", "aes-gcm-16-256": "AES-GCM", "chacha20-poly1305": "CHACHA20-POLY1305"},
    "gmac": "AES-NULL-GMAC",
    "cbc-hmac": "AES-CBC",
    "null-hmac": "NULL",
}
SCAPY_AUTH = {"sha256": "SHA2-256-128", "sha384": "SHA2-384-192", "sha512": "SHA2-512-256"}


def scapy_sa(p: SAParams, addrs: tuple[str, str]) -> ScapySA:
    s = p.suite_obj
    kw: dict[str, object] = {}
    if s.protocol == "esp":
        crypt = SCAPY_CRYPT[s.kind]
        kw["crypt_algo"] = crypt[s.name] if isinstance(crypt, dict) else crypt
        kw["crypt_key"] = p.enc_key or None
    if s.hash_name:
        kw["auth_algo"] = SCAPY_AUTH[s.hash_name]
        kw["auth_key"] = p.auth_key
    if p.mode == "tunnel":
        kw["tunnel_header"] = IP(src=addrs[0], dst=addrs[1]) if ":" not in addrs[0] else IPv6(src=addrs[0], dst=addrs[1])
    if p.udp_encap_port:
        kw["nat_t_header"] = UDP(sport=p.udp_encap_port, dport=p.udp_encap_port)
    return ScapySA(ESP if s.protocol == "esp" else AH, spi=p.spi, **kw)


def scapy_ip(wire: bytes):  # type: ignore[no-untyped-def]
    return IP(wire) if wire[0] >> 4 == 4 else IPv6(wire)


CASES = [(s, m, a) for s in ESP_SUITES + AH_SUITES for m in ("transport", "tunnel") for a in ("v4", "v6")]


def _addrs(a: str) -> tuple[str, str]:
    return V4 if a == "v4" else V6


@pytest.mark.parametrize(("suite", "mode", "af"), CASES)
def test_we_seal_scapy_opens(suite: str, mode: str, af: str) -> None:
    addrs = _addrs(af)
    p = make_params(suite, mode, addrs)
    ours = SecurityAssociation(p, "out", 0.0)
    theirs = scapy_sa(p, addrs)
    for size in (0, 1, 2, 3, 17, 300):
        pkt = build_udp_packet(addrs[0], addrs[1], 5000, 6000, os.urandom(size), ttl=9)
        wire = protect(ours, pkt, 1.0)
        opened = theirs.decrypt(scapy_ip(wire))
        assert raw(opened) == pkt
        # and scapy really checks: a flipped ICV byte is refused
        bad = bytearray(wire)
        bad[-1] ^= 1
        with pytest.raises(IPSecIntegrityError):
            theirs.decrypt(scapy_ip(bytes(bad)))


@pytest.mark.parametrize(("suite", "mode", "af"), CASES)
def test_scapy_seals_we_open(suite: str, mode: str, af: str) -> None:
    addrs = _addrs(af)
    p = make_params(suite, mode, addrs)
    sad = SAD()
    ours = SecurityAssociation(p, "in", 0.0)
    sad.add(ours)
    theirs = scapy_sa(p, addrs)
    for size in (0, 1, 2, 3, 17, 300):
        pkt = build_udp_packet(addrs[0], addrs[1], 5000, 6000, os.urandom(size), ttl=9)
        wire = raw(theirs.encrypt(scapy_ip(pkt)))
        restored, sa = unprotect_untrusted(sad, wire, 1.0)
        assert sa is ours
        assert restored == pkt
    assert ours.statistics()["packets"] == 6


@pytest.mark.parametrize("suite", AH_SUITES)
@pytest.mark.parametrize("align4", [False, True])
def test_ipv4_ah_alignment_both_ways(suite: str, align4: bool) -> None:
    p = make_params(suite, "transport", V4, ah_align4=align4)
    ours = SecurityAssociation(p, "out", 0.0)
    pkt = build_udp_packet(*V4, 1, 2, b"x" * 10)
    wire = protect(ours, pkt, 1.0)
    info = parse_ip_untrusted(wire)
    ah_len = (info.payload[1] + 2) * 4
    base = 12 + p.suite_obj.icv_len
    assert ah_len == base + (-base) % (4 if align4 else 8)
    assert raw(scapy_sa(p, V4).decrypt(IP(wire))) == pkt


def test_scapy_ah_ipv4_is_32_bit_aligned() -> None:
    """What scapy sends: SHA-384's 24-byte ICV needs no padding at 32 bits (36-byte AH)."""
    p = make_params("hmac-sha-384-192", "transport", V4)
    wire = raw(scapy_sa(p, V4).encrypt(IP(build_udp_packet(*V4, 1, 2, b"abc"))))
    assert (wire[20 + 1] + 2) * 4 == 36


@pytest.mark.parametrize("mode", ["transport", "tunnel"])
def test_esp_in_udp_both_ways(mode: str) -> None:
    p = make_params("aes-gcm-16-128", mode, V4, udp_encap_port=4500)
    out = SecurityAssociation(p, "out", 0.0)
    sad = SAD()
    sad.add(SecurityAssociation(p, "in", 0.0))
    theirs = scapy_sa(p, V4)
    pkt = build_udp_packet(*V4, 5000, 6000, b"hello over 4500")
    wire = protect(out, pkt, 1.0)
    info = parse_ip_untrusted(wire)
    assert (info.proto, info.dport) == (17, 4500)
    assert raw(theirs.decrypt(IP(wire))) == pkt
    wire2 = raw(theirs.encrypt(IP(pkt)))
    assert unprotect_untrusted(sad, wire2, 1.0)[0] == pkt


def test_scapy_tampered_packet_refused_by_us() -> None:
    p = make_params("aes-gcm-16-128", "tunnel", V4)
    sad = SAD()
    sad.add(SecurityAssociation(p, "in", 0.0))
    wire = bytearray(raw(scapy_sa(p, V4).encrypt(IP(build_udp_packet(*V4, 1, 2, b"payload")))))
    wire[40] ^= 0x80
    with pytest.raises(AuthenticationFailed):
        unprotect_untrusted(sad, bytes(wire), 1.0)
