"""Packet captures: read and write pcap (and read pcapng), pure code.

Readers take the bytes of a whole capture file and end in ``_untrusted``: a truncated or
hostile file raises :class:`~groupsec.errors.BadPacket` (never ``struct.error`` or
``IndexError``), with a message that says what is wrong and at which record.

Link types understood: Ethernet (1, with 802.1Q/802.1ad tags), raw IP (101, 12, 14),
IPv4 (228), IPv6 (229), BSD loopback / null (0 and 108), Linux cooked SLL (113) and
SLL2 (276). :func:`link_payload_untrusted` strips the link header and returns the IP
packet, or ``None`` for a frame that does not carry IP (ARP, LLDP, ...).

The writer produces classic little-endian microsecond pcap, which every tool reads.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from groupsec.errors import BadPacket

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
_RAW_ALIASES = (12, 14)  # DLT_RAW as some BSDs write it

LINKTYPES = {
    LINKTYPE_NULL: "null", LINKTYPE_ETHERNET: "ethernet", LINKTYPE_RAW: "raw", 12: "raw", 14: "raw",
    LINKTYPE_LOOP: "loop", LINKTYPE_LINUX_SLL: "linux-sll", LINKTYPE_IPV4: "ipv4", LINKTYPE_IPV6: "ipv6",
    LINKTYPE_LINUX_SLL2: "linux-sll2",
}

MAX_RECORD = 256 * 1024  # bigger than any snaplen a capture tool uses; bounds a hostile length
MAX_RECORDS = 10_000_000

_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
}
_PCAPNG_SHB = 0x0A0D0D0A
_ETH_IPV4, _ETH_IPV6, _ETH_VLAN, _ETH_QINQ = 0x0800, 0x86DD, 0x8100, 0x88A8
_AF_INET = 2
_AF_INET6 = (10, 24, 28, 30)  # Linux, NetBSD/OpenBSD, FreeBSD, macOS


@dataclass(frozen=True, slots=True)
class Record:
    """One captured frame. ``index`` counts from 1, like Wireshark's frame numbers."""

    index: int
    timestamp: float
    linktype: int
    data: bytes
    orig_len: int

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.orig_len


def _unpack(fmt: struct.Struct, data: bytes, offset: int, what: str) -> tuple[int, ...]:
    if offset < 0 or offset + fmt.size > len(data):
        raise BadPacket(f"truncated capture: {what} at byte {offset} needs {fmt.size} bytes")
    return fmt.unpack_from(data, offset)


def read_capture_untrusted(data: bytes) -> list[Record]:
    """Every record of a pcap or pcapng file, in file order."""
    return list(iter_capture_untrusted(data))


def iter_capture_untrusted(data: bytes) -> Iterator[Record]:
    data = bytes(data)
    if len(data) < 4:
        raise BadPacket(f"not a capture file: {len(data)} bytes is shorter than any pcap header")
    magic = data[:4]
    if magic in _PCAP_MAGIC:
        return _iter_pcap(data)
    if struct.unpack_from("<I", data)[0] == _PCAPNG_SHB:
        return _iter_pcapng(data)
    raise BadPacket(f"not a pcap or pcapng file (magic bytes {magic.hex()})")


def _iter_pcap(data: bytes) -> Iterator[Record]:
    endian, ticks = _PCAP_MAGIC[data[:4]]
    hdr = struct.Struct(endian + "IHHiIII")
    _, major, _minor, _zone, _sigfigs, _snaplen, network = _unpack(hdr, data, 0, "file header")
    if major != 2:
        raise BadPacket(f"unsupported pcap version {major}")
    linktype = network & 0x0FFFFFFF  # the top bits carry FCS information
    rec = struct.Struct(endian + "IIII")
    offset, index = hdr.size, 0
    while offset < len(data):
        sec, frac, incl, orig = _unpack(rec, data, offset, f"record {index + 1} header")
        if incl > MAX_RECORD:
            raise BadPacket(f"record {index + 1}: captured length {incl} is above {MAX_RECORD}")
        if frac >= ticks:
            raise BadPacket(f"record {index + 1}: timestamp fraction {frac} out of range")
        start = offset + rec.size
        if start + incl > len(data):
            raise BadPacket(f"truncated capture: record {index + 1} needs {incl} bytes, "
                            f"{len(data) - start} remain")
        index += 1
        if index > MAX_RECORDS:
            raise BadPacket(f"more than {MAX_RECORDS} records")
        yield Record(index, sec + frac / ticks, linktype, data[start:start + incl], max(orig, incl))
        offset = start + incl


def _iter_pcapng(data: bytes) -> Iterator[Record]:
    endian = "<"
    interfaces: list[tuple[int, float]] = []  # (linktype, seconds per tick)
    offset, index = 0, 0
    while offset < len(data):
        if len(data) - offset < 12:
            raise BadPacket(f"truncated pcapng block at byte {offset}")
        (btype,) = struct.unpack_from(endian + "I", data, offset)
        if btype == _PCAPNG_SHB:
            bom = data[offset + 8:offset + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise BadPacket(f"pcapng section at byte {offset}: bad byte-order magic {bom.hex()}")
            interfaces = []
        (blen,) = struct.unpack_from(endian + "I", data, offset + 4)
        if blen < 12 or blen % 4 or offset + blen > len(data):
            raise BadPacket(f"pcapng block at byte {offset}: bad length {blen}")
        body = data[offset + 8:offset + blen - 4]
        if btype == 1:  # Interface Description Block
            linktype, _, _ = _unpack(struct.Struct(endian + "HHI"), body, 0, "interface block")
            interfaces.append((linktype, _if_tsresol(body[8:], endian)))
        elif btype in (6, 3):  # Enhanced / Simple Packet Block
            index += 1
            if btype == 6:
                iface, ts_hi, ts_lo, incl, orig = _unpack(struct.Struct(endian + "IIIII"), body, 0, "packet block")
                start = 20
            else:
                (orig,) = _unpack(struct.Struct(endian + "I"), body, 0, "packet block")
                iface, ts_hi, ts_lo, start = 0, 0, 0, 4
                incl = min(orig, len(body) - 4)
            if iface >= len(interfaces):
                raise BadPacket(f"record {index}: refers to undefined interface {iface}")
            if incl > MAX_RECORD or start + incl > len(body):
                raise BadPacket(f"record {index}: captured length {incl} does not fit its block")
            linktype, tick = interfaces[iface]
            yield Record(index, ((ts_hi << 32) | ts_lo) * tick, linktype, body[start:start + incl], max(orig, incl))
        offset += blen


def _if_tsresol(options: bytes, endian: str) -> float:
    off = 0
    while off + 4 <= len(options):
        code, length = struct.unpack_from(endian + "HH", options, off)
        if code == 0:
            break
        if code == 9 and length >= 1 and off + 5 <= len(options):
            v = options[off + 4]
            return 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -(v & 0x7F)
        off += 4 + ((length + 3) & ~3)
    return 1e-6


def link_payload_untrusted(linktype: int, frame: bytes) -> bytes | None:
    """The IP packet inside one frame, or None when the frame carries something else."""
    if linktype in (LINKTYPE_RAW, *_RAW_ALIASES, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return frame
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            raise BadPacket(f"Ethernet frame of {len(frame)} bytes is shorter than its header")
        off = 12
        (etype,) = struct.unpack_from("!H", frame, off)
        while etype in (_ETH_VLAN, _ETH_QINQ):
            off += 4
            if len(frame) < off + 2:
                raise BadPacket("truncated 802.1Q tag")
            (etype,) = struct.unpack_from("!H", frame, off)
        return frame[off + 2:] if etype in (_ETH_IPV4, _ETH_IPV6) else None
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if len(frame) < 4:
            raise BadPacket("truncated loopback header")
        family = struct.unpack_from("<I" if linktype == LINKTYPE_NULL else "!I", frame)[0]
        if family > 0xFFFF:  # written by a host of the other byte order
            family = struct.unpack_from(">I" if linktype == LINKTYPE_NULL else "<I", frame)[0]
        return frame[4:] if family == _AF_INET or family in _AF_INET6 else None
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            raise BadPacket("truncated Linux cooked (SLL) header")
        (proto,) = struct.unpack_from("!H", frame, 14)
        return frame[16:] if proto in (_ETH_IPV4, _ETH_IPV6) else None
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            raise BadPacket("truncated Linux cooked (SLL2) header")
        (proto,) = struct.unpack_from("!H", frame, 0)
        return frame[20:] if proto in (_ETH_IPV4, _ETH_IPV6) else None
    raise BadPacket(f"unsupported link type {linktype} (supported: {', '.join(sorted(set(LINKTYPES.values())))})")


# --- writing ------------------------------------------------------------------------------


class PcapWriter:
    """Writes classic pcap (little-endian, microseconds) to a binary file object."""

    def __init__(self, out: BinaryIO, linktype: int = LINKTYPE_RAW, snaplen: int = 65535) -> None:
        if linktype not in LINKTYPES:
            raise ValueError(f"unsupported link type {linktype}")
        self._out = out
        self.linktype = linktype
        self.snaplen = snaplen
        self.count = 0
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype))

    def write(self, data: bytes, timestamp: float) -> None:
        sec = int(timestamp)
        usec = min(999_999, round((timestamp - sec) * 1_000_000))
        incl = data[:self.snaplen]
        self._out.write(struct.pack("<IIII", sec, usec, len(incl), len(data)))
        self._out.write(incl)
        self.count += 1


def pcap_bytes(packets: Iterable[tuple[float, bytes]], linktype: int = LINKTYPE_RAW) -> bytes:
    """A whole pcap file in memory from ``(timestamp, frame)`` pairs."""
    import io

    buf = io.BytesIO()
    w = PcapWriter(buf, linktype)
    for ts, frame in packets:
        w.write(frame, ts)
    return buf.getvalue()


def ethernet_frame(ip_packet: bytes, src_mac: bytes = b"\x02\x00\x00\x00\x00\x01",
                   dst_mac: bytes | None = None) -> bytes:
    """Wrap an IP packet in Ethernet. The default destination is the multicast MAC that
    RFC 1112 / RFC 2464 map the packet's destination group to (or a unicast dummy)."""
    version = ip_packet[0] >> 4 if ip_packet else 0
    if dst_mac is None:
        if version == 4 and len(ip_packet) >= 20 and 224 <= ip_packet[16] <= 239:
            dst_mac = b"\x01\x00\x5e" + bytes([ip_packet[17] & 0x7F]) + ip_packet[18:20]
        elif version == 6 and len(ip_packet) >= 40 and ip_packet[24] == 0xFF:
            dst_mac = b"\x33\x33" + ip_packet[36:40]
        else:
            dst_mac = b"\x02\x00\x00\x00\x00\x02"
    etype = _ETH_IPV6 if version == 6 else _ETH_IPV4
    return dst_mac + src_mac + struct.pack("!H", etype) + ip_packet


def linux_sll_frame(ip_packet: bytes, packet_type: int = 4) -> bytes:
    """Wrap an IP packet in a Linux cooked (SLL, link type 113) header, as `tcpdump -i any`."""
    version = ip_packet[0] >> 4 if ip_packet else 0
    etype = _ETH_IPV6 if version == 6 else _ETH_IPV4
    return struct.pack("!HHH8sH", packet_type, 772, 0, b"", etype) + ip_packet
