"""Packets sealed by Linux 6.1 XFRM open to the payloads the kernel was given."""

from __future__ import annotations

import json

import pytest
from ipsec_helpers import KERNEL, kernel_sas, read_pcap_ip

from groupsec.errors import ReplayDetected
from groupsec.ipsec.ip import PROTO_AH, PROTO_ESP, PROTO_UDP, parse_ip_untrusted
from groupsec.ipsec.packet import unprotect_untrusted
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sad import SAD


def _ipsec_packets() -> list[bytes]:
    out = []
    for pkt in read_pcap_ip(KERNEL / "kernel-vectors.pcap"):
        info = parse_ip_untrusted(pkt)
        if info.proto in (PROTO_ESP, PROTO_AH) or (info.proto == PROTO_UDP and info.dport == 4500):
            out.append(pkt)
    return out


def test_every_kernel_packet_opens_to_its_payload() -> None:
    expected = json.loads((KERNEL / "packets.json").read_text())
    packets = _ipsec_packets()
    assert len(packets) == len(expected) == 39
    params = kernel_sas()
    sad = SAD()
    for p in params.values():
        sad.add(SecurityAssociation(p, "in", 0.0))
    seen_suites = set()
    for pkt, exp in zip(packets, expected, strict=True):
        restored, sa = unprotect_untrusted(sad, pkt, 1.0)
        assert sa.params is params[exp["sa"]], exp["sa"]
        seen_suites.add(sa.params.suite)
        inner = parse_ip_untrusted(restored)
        assert inner.proto == PROTO_UDP
        assert inner.udp_payload == bytes.fromhex(exp["payload_hex"]), exp["sa"]
        assert inner.dst == sa.params.dst
        if sa.params.mode == "tunnel":  # RFC 5374 address preservation by the kernel too
            assert inner.src == sa.params.src
    assert len(seen_suites) == 9  # every transform of sas.json
    for sa in sad:
        stats = sa.statistics()
        assert stats["packets"] == 3
        assert stats["drops"] == {}


@pytest.mark.parametrize("index", [0, 21, 24, 30])
def test_kernel_packet_replayed_is_refused(index: int) -> None:
    pkt = _ipsec_packets()[index]
    sad = SAD()
    for p in kernel_sas().values():
        sad.add(SecurityAssociation(p, "in", 0.0))
    unprotect_untrusted(sad, pkt, 1.0)
    with pytest.raises(ReplayDetected):
        unprotect_untrusted(sad, pkt, 1.0)


def test_kernel_ipv4_ah_uses_64_bit_padding() -> None:
    """The kernel pads IPv4 AH to 64 bits (its README); we accepted those above."""
    lengths = set()
    for pkt in _ipsec_packets():
        info = parse_ip_untrusted(pkt)
        if info.proto == PROTO_AH and info.version == 4:
            lengths.add((info.payload[1] + 2) * 4)
    # 12 + 16 (SHA-256-128) + 4 padding, 12 + 24 (SHA-384-192) + 4 padding
    assert lengths == {32, 40}
