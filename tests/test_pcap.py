"""groupsec.pcap: pcap/pcapng reading and writing, link-layer decoding, hostile files."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groupsec import pcap
from groupsec.errors import BadPacket, GroupSecError
from groupsec.ipsec.ip import build_udp_packet, parse_ip_untrusted

PKT4 = build_udp_packet("10.0.0.1", "239.1.2.3", 4000, 5000, b"hello")
PKT6 = build_udp_packet("fd00::1", "ff0e::1:2", 4000, 5000, b"hello6")


def test_roundtrip_raw_timestamps_and_order() -> None:
    data = pcap.pcap_bytes([(1700000000.25, PKT4), (1700000001.5, PKT6)])
    recs = pcap.read_capture_untrusted(data)
    assert [r.index for r in recs] == [1, 2]
    assert [r.data for r in recs] == [PKT4, PKT6]
    assert recs[0].timestamp == pytest.approx(1700000000.25)
    assert recs[1].linktype == pcap.LINKTYPE_RAW
    assert not recs[0].truncated


@pytest.mark.parametrize(
    ("linktype", "wrap"),
    [
        (pcap.LINKTYPE_ETHERNET, pcap.ethernet_frame),
        (pcap.LINKTYPE_LINUX_SLL, pcap.linux_sll_frame),
        (pcap.LINKTYPE_RAW, lambda p: p),
        (pcap.LINKTYPE_NULL, lambda p: struct.pack("<I", 2 if p[0] >> 4 == 4 else 10) + p),
        (pcap.LINKTYPE_LINUX_SLL2, lambda p: struct.pack("!HHIHBB8s", 0x0800 if p[0] >> 4 == 4 else 0x86DD,
                                                          0, 1, 772, 0, 6, b"") + p),
    ],
)
def test_link_layers_yield_the_ip_packet(linktype: int, wrap) -> None:
    data = pcap.pcap_bytes([(1.0, wrap(PKT4)), (2.0, wrap(PKT6))], linktype=linktype)
    got = [pcap.link_payload_untrusted(r.linktype, r.data) for r in pcap.read_capture_untrusted(data)]
    assert got == [PKT4, PKT6]
    assert parse_ip_untrusted(got[0]).udp_payload == b"hello"


def test_ethernet_multicast_mac_and_vlan_tag() -> None:
    frame = pcap.ethernet_frame(PKT4)
    assert frame[:6] == bytes.fromhex("01005e010203")  # RFC 1112 mapping of 239.1.2.3
    assert pcap.ethernet_frame(PKT6)[:6] == bytes.fromhex("333300010002")
    tagged = frame[:12] + b"\x81\x00\x00\x05" + frame[12:]
    assert pcap.link_payload_untrusted(pcap.LINKTYPE_ETHERNET, tagged) == PKT4
    arp = frame[:12] + b"\x08\x06" + b"\x00" * 28
    assert pcap.link_payload_untrusted(pcap.LINKTYPE_ETHERNET, arp) is None


def _pcapng(packets: list[bytes], linktype: int = pcap.LINKTYPE_RAW, endian: str = "<") -> bytes:
    def block(btype: int, body: bytes) -> bytes:
        body += b"\x00" * (-len(body) % 4)
        n = 12 + len(body)
        return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)

    out = block(0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    out += block(1, struct.pack(endian + "HHI", linktype, 0, 65535))
    for i, p in enumerate(packets):
        ts = (1_000_000 + i) * 1_000_000
        out += block(6, struct.pack(endian + "IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(p), len(p)) + p)
    return out


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcapng_read(endian: str) -> None:
    recs = pcap.read_capture_untrusted(_pcapng([PKT4, PKT6], endian=endian))
    assert [r.data for r in recs] == [PKT4, PKT6]
    assert recs[1].timestamp == pytest.approx(1_000_001.0)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_our_pcap(tmp_path) -> None:
    path = tmp_path / "c.pcap"
    path.write_bytes(pcap.pcap_bytes([(1.0, pcap.ethernet_frame(PKT4)), (2.0, pcap.ethernet_frame(PKT6))],
                                     linktype=pcap.LINKTYPE_ETHERNET))
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "ip.dst", "-e", "ipv6.dst",
                          "-e", "udp.payload"], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["239.1.2.3\t\t" + b"hello".hex(), "\tff0e::1:2\t" + b"hello6".hex()]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "shorter than any pcap header"),
        (b"GIF89a" + b"\x00" * 40, "not a pcap or pcapng file"),
        (pcap.pcap_bytes([(1.0, PKT4)])[:30], "truncated capture"),
        (pcap.pcap_bytes([(1.0, PKT4)])[:-3], "truncated capture: record 1"),
        (pcap.pcap_bytes([]) + struct.pack("<IIII", 0, 0, 10**9, 10**9), "above"),
        (_pcapng([PKT4])[:-8], "bad length"),
    ],
)
def test_malformed_files_raise_badpacket_with_a_reason(data: bytes, fragment: str) -> None:
    with pytest.raises(BadPacket, match=fragment):
        pcap.read_capture_untrusted(data)


def test_unsupported_linktype_is_named() -> None:
    with pytest.raises(BadPacket, match="unsupported link type 147"):
        pcap.link_payload_untrusted(147, b"\x00" * 40)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 300))
def test_random_bytes_raise_only_our_errors(tail: bytes, cut: int) -> None:
    for data in (tail, pcap.pcap_bytes([(1.0, PKT4)])[:cut] + tail, _pcapng([PKT4])[:cut] + tail):
        try:
            for rec in pcap.iter_capture_untrusted(data):
                pcap.link_payload_untrusted(rec.linktype, rec.data)
        except GroupSecError:
            pass
