"""Every byte of a sealed packet matters: tampering is refused with the precise error."""

from __future__ import annotations

import struct

import pytest
from ipsec_helpers import V4, V6, pair

from groupsec.errors import AuthenticationFailed, BadPacket, GroupSecError, UnknownSPI
from groupsec.ipsec.ip import build_udp_packet, checksum
from groupsec.ipsec.packet import protect, unprotect_untrusted
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sad import SAD
from groupsec.ipsec.suites import AH_SUITES, ESP_SUITES


@pytest.mark.parametrize("suite", ESP_SUITES)
def test_every_esp_byte_is_protected(suite: str) -> None:
    out, inb, _ = pair(suite)
    out.seal_esp(4, b"first", 0.0)
    esp = out.seal_esp(4, bytes(range(37)), 0.0)  # sequence number 2
    for i in range(len(esp)):
        for flip in (0x01, 0x80):
            bad = bytearray(esp)
            bad[i] ^= flip
            # the SPI names the SA: a changed SPI is not this SA's; everything else is authenticated
            expected = UnknownSPI if i < 4 else AuthenticationFailed
            with pytest.raises(expected):
                inb.open_esp_untrusted(bytes(bad), 0.0)
    # the failures changed nothing: the genuine packet still opens, and was counted as drops
    assert inb.open_esp_untrusted(esp, 0.0) == (4, bytes(range(37)), 0)
    drops = inb.statistics()["drops"]
    assert drops == {"unknown-spi": 8, "auth-failed": 2 * (len(esp) - 4)}


def _fix_v4_checksum(pkt: bytearray) -> None:
    pkt[10:12] = b"\x00\x00"
    pkt[10:12] = struct.pack("!H", checksum(pkt[:20]))


def _expected_v4(i: int, pkt: bytes, ah_len: int) -> type[GroupSecError] | None:
    if i == 0:
        return BadPacket  # header length
    if i in (1, 8):
        return None  # TOS, TTL: mutable
    if i in (2, 3):
        total = struct.unpack_from("!H", pkt, 2)[0] ^ (1 << (8 if i == 2 else 0))
        return BadPacket if total > len(pkt) else AuthenticationFailed
    if i in (6, 7):
        return BadPacket  # the flip makes it a fragment
    if i == 9 or 16 <= i < 20 or 24 <= i < 28:
        return UnknownSPI  # protocol (now ESP), group address, SPI
    if i == 21:
        return BadPacket  # AH length
    return AuthenticationFailed


def _expected_v6(i: int, pkt: bytes) -> type[GroupSecError] | None:
    if i in (0, 1, 2, 3, 7):
        return None  # traffic class (the flip at byte 0 is in its low bits), flow label, hop limit: mutable
    if i in (4, 5):
        plen = struct.unpack_from("!H", pkt, 4)[0] ^ (1 << (8 if i == 4 else 0))
        return BadPacket if plen == 0 or 40 + plen > len(pkt) else AuthenticationFailed
    if i == 6 or 24 <= i < 40 or 44 <= i < 48:
        return UnknownSPI  # next header (now ESP), group address, SPI
    if i == 41:
        return BadPacket  # AH length
    return AuthenticationFailed


@pytest.mark.parametrize("suite", AH_SUITES)
@pytest.mark.parametrize("af", ["v4", "v6"])
@pytest.mark.parametrize("mode", ["transport", "tunnel"])
def test_every_ah_byte(suite: str, af: str, mode: str) -> None:
    addrs = V4 if af == "v4" else V6
    out, inb, _ = pair(suite, mode, addrs)
    pkt = build_udp_packet(addrs[0], addrs[1], 1234, 5678, b"ah payload", ttl=32)
    protect(out, pkt, 0.0)
    wire = protect(out, pkt, 0.0)  # sequence number 2
    hl = 20 if af == "v4" else 40
    ah_len = (wire[hl + 1] + 2) * 4
    for i in range(len(wire)):
        if af == "v4" and i in (10, 11):
            continue  # the header checksum is recomputed below, as a forwarding router would
        bad = bytearray(wire)
        bad[i] ^= 0x01
        if af == "v4":
            _fix_v4_checksum(bad)
        expected = _expected_v4(i, wire, ah_len) if af == "v4" else _expected_v6(i, wire)
        fresh = SAD()  # a receiver that has not seen this sequence number yet
        fresh.add(SecurityAssociation(inb.params, "in", 0.0))
        if expected is None:
            restored, _ = unprotect_untrusted(fresh, bytes(bad), 0.0)
            assert restored[-10:] == b"ah payload"
            continue
        with pytest.raises(expected):
            unprotect_untrusted(fresh, bytes(bad), 0.0)


@pytest.mark.parametrize("suite", AH_SUITES)
def test_ah_mutable_fields_as_routers_change_them(suite: str) -> None:
    out, _, sad = pair(suite, "transport", V4)
    pkt = build_udp_packet(*V4, 1, 2, b"x" * 20, ttl=64)
    for change in ({1: 0xB8}, {8: 1}, {6: 0x40}):  # DSCP EF, TTL 1, DF set
        wire = bytearray(protect(out, pkt, 0.0))
        for off, value in change.items():
            wire[off] = value
        _fix_v4_checksum(wire)
        restored, _ = unprotect_untrusted(sad, bytes(wire), 0.0)
        assert restored[20:] == pkt[20:]
    out6, _, sad6 = pair(suite, "transport", V6)
    pkt6 = build_udp_packet(*V6, 1, 2, b"y" * 20, ttl=64)
    wire6 = bytearray(protect(out6, pkt6, 0.0))
    wire6[0:4] = bytes((0x6B, 0x81, 0x23, 0x45))  # traffic class and flow label
    wire6[7] = 3  # hop limit
    assert unprotect_untrusted(sad6, bytes(wire6), 0.0)[0][40:] == pkt6[40:]
