"""IPv4/IPv6 headers: parsing untrusted packets and building UDP datagrams.

``parse_ip_untrusted`` walks the IPv6 extension headers, so callers (and the ESP/AH
code in ``groupsec.ipsec.packet``) know the final next header, where a transport-mode
ESP/AH header is inserted, and the UDP ports. It raises only ``BadPacket``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from groupsec.errors import BadPacket

PROTO_HOPOPTS = 0
PROTO_IPIP = 4
PROTO_UDP = 17
PROTO_IPV6 = 41
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ESP = 50
PROTO_AH = 51
PROTO_NONE = 59
PROTO_DSTOPTS = 60

IPV6_EXT = frozenset((PROTO_HOPOPTS, PROTO_ROUTING, PROTO_FRAGMENT, PROTO_DSTOPTS))
MAX_IPV4_LEN = 65535
DEFAULT_TTL = 64

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_H = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class IPInfo:
    """What a data path needs to know about one IP packet."""

    version: int
    src: str
    dst: str
    proto: int  # the final next header (after IPv6 extension headers)
    header_len: int  # bytes before the final next header's data
    payload: bytes  # the final next header's data
    ttl: int  # TTL or hop limit
    total_len: int  # the packet's length according to its header
    insert_off: int  # where a transport-mode ESP/AH header goes
    nh_off: int  # offset of the next-header byte that points at insert_off's data
    fragment: bool = False
    last_nh_off: int = 9  # offset of the next-header byte that names ``proto``
    sport: int | None = None  # UDP only
    dport: int | None = None
    udp_payload: bytes | None = None


# --- addresses ---------------------------------------------------------------------------

_ADDR_CACHE: dict[bytes, str] = {}
_PACK_CACHE: dict[str, bytes] = {}
_CACHE_MAX = 4096


def addr_to_str(raw: bytes) -> str:
    """Packed IPv4/IPv6 address to its canonical text form."""
    s = _ADDR_CACHE.get(raw)
    if s is None:
        s = str(ipaddress.ip_address(raw))
        if len(_ADDR_CACHE) >= _CACHE_MAX:
            _ADDR_CACHE.clear()
        _ADDR_CACHE[raw] = s
    return s


def addr_to_bytes(addr: str) -> bytes:
    """Text address to packed bytes; ``BadPacket`` if it is not an address."""
    b = _PACK_CACHE.get(addr)
    if b is None:
        try:
            b = ipaddress.ip_address(addr).packed
        except ValueError:
            raise BadPacket(f"not an IP address: {addr!r}") from None
        if len(_PACK_CACHE) >= _CACHE_MAX:
            _PACK_CACHE.clear()
        _PACK_CACHE[addr] = b
    return b


def canonical(addr: str) -> str:
    """The canonical text form of an address (``FF0E::0002:11`` -> ``ff0e::2:11``)."""
    return addr_to_str(addr_to_bytes(addr))


# --- checksums ---------------------------------------------------------------------------


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF
    if s == 0 and n:
        s = 0xFFFF
    return (~s) & 0xFFFF


def udp_checksum(src: bytes, dst: bytes, udp: bytes | bytearray) -> int:
    """UDP checksum over the pseudo-header (RFC 768 / RFC 8200 s8.1); 0 is sent as 0xFFFF."""
    if len(src) == 4:
        pseudo = src + dst + bytes((0, PROTO_UDP)) + _H.pack(len(udp))
    else:
        pseudo = src + dst + len(udp).to_bytes(4, "big") + bytes((0, 0, 0, PROTO_UDP))
    c = checksum(pseudo + bytes(udp))
    return c or 0xFFFF


# --- building ----------------------------------------------------------------------------


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, *, ttl: int = DEFAULT_TTL, tos: int = 0,
                ident: int = 0, flags_frag: int = 0) -> bytes:
    total = 20 + payload_len
    if total > MAX_IPV4_LEN:
        raise BadPacket(f"IPv4 packet of {total} bytes exceeds 65535")
    hdr = bytearray(_V4.pack(0x45, tos, total, ident, flags_frag, ttl, proto, 0, src, dst))
    hdr[10:12] = _H.pack(checksum(hdr))
    return bytes(hdr)


def ipv6_header(src: bytes, dst: bytes, nh: int, payload_len: int, *, hlim: int = DEFAULT_TTL, tclass: int = 0,
                flow: int = 0) -> bytes:
    if payload_len > 0xFFFF:
        raise BadPacket(f"IPv6 payload of {payload_len} bytes needs a jumbogram")
    return _V6.pack((6 << 28) | (tclass << 20) | (flow & 0xFFFFF), payload_len, nh, hlim, src, dst)


def build_udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes, ttl: int = DEFAULT_TTL,
                     tos: int = 0) -> bytes:
    """A complete IPv4 or IPv6 UDP packet with correct checksums."""
    s, d = addr_to_bytes(src), addr_to_bytes(dst)
    if len(s) != len(d):
        raise BadPacket("source and destination are of different IP versions")
    udp = bytearray(_UDP.pack(sport, dport, 8 + len(payload), 0) + payload)
    if len(udp) > 0xFFFF:
        raise BadPacket("UDP datagram too large")
    udp[6:8] = _H.pack(udp_checksum(s, d, udp))
    if len(s) == 4:
        return ipv4_header(s, d, PROTO_UDP, len(udp), ttl=ttl, tos=tos) + bytes(udp)
    return ipv6_header(s, d, PROTO_UDP, len(udp), hlim=ttl, tclass=tos) + bytes(udp)


# --- parsing -----------------------------------------------------------------------------


def parse_ip_untrusted(data: bytes | bytearray | memoryview) -> IPInfo:
    """Parse an IPv4 or IPv6 packet. Raises only ``BadPacket``."""
    data = bytes(data)
    if not data:
        raise BadPacket("empty packet")
    version = data[0] >> 4
    if version == 4:
        return _parse_v4(data)
    if version == 6:
        return _parse_v6(data)
    raise BadPacket(f"IP version {version}")


def _parse_v4(data: bytes) -> IPInfo:
    if len(data) < 20:
        raise BadPacket("truncated IPv4 header")
    vihl, _tos, total, _id, ff, ttl, proto, _ck, src, dst = _V4.unpack_from(data)
    hl = (vihl & 0x0F) * 4
    if hl < 20 or total < hl or total > len(data):
        raise BadPacket("bad IPv4 header or total length")
    if checksum(data[:hl]) != 0:
        raise BadPacket("bad IPv4 header checksum")
    fragment = bool(ff & 0x3FFF)
    return _finish(4, data, addr_to_str(src), addr_to_str(dst), proto, hl, total, ttl, hl, 9, fragment, 9)


def _parse_v6(data: bytes) -> IPInfo:
    if len(data) < 40:
        raise BadPacket("truncated IPv6 header")
    _vtf, plen, nh, hlim, src, dst = _V6.unpack_from(data)
    total = 40 + plen
    if plen == 0 or total > len(data):
        raise BadPacket("bad IPv6 payload length (jumbograms are not supported)")
    off, nh_off = 40, 6
    insert_off, insert_nh_off = 40, 6
    seen_routing = False
    fragment = False
    while nh in IPV6_EXT:
        if off + 8 > total:
            raise BadPacket("truncated IPv6 extension header")
        if nh == PROTO_FRAGMENT:
            fragment = True
            ext_len = 8
        else:
            ext_len = (data[off + 1] + 1) * 8
        if off + ext_len > total:
            raise BadPacket("truncated IPv6 extension header")
        # RFC 4303 s3.1.1 / Linux: ESP/AH go after hop-by-hop, routing and fragment headers,
        # and after destination options that come before a routing header.
        if nh == PROTO_ROUTING:
            seen_routing = True
        if not (nh == PROTO_DSTOPTS and seen_routing) and insert_off == off:
            insert_off, insert_nh_off = off + ext_len, off
        nh, nh_off = data[off], off
        off += ext_len
    return _finish(6, data, addr_to_str(src), addr_to_str(dst), nh, off, total, hlim, insert_off, insert_nh_off,
                   fragment, nh_off)


def _finish(version: int, data: bytes, src: str, dst: str, proto: int, off: int, total: int, ttl: int,
            insert_off: int, nh_off: int, fragment: bool, last_nh_off: int) -> IPInfo:
    payload = data[off:total]
    sport = dport = None
    udp_payload = None
    if proto == PROTO_UDP and not fragment:
        if len(payload) < 8:
            raise BadPacket("truncated UDP header")
        sport, dport, ulen, _ = _UDP.unpack_from(payload)
        if ulen < 8 or ulen > len(payload):
            raise BadPacket("bad UDP length")
        udp_payload = payload[8:ulen]
    return IPInfo(version, src, dst, proto, off, payload, ttl, total, insert_off, nh_off, fragment, last_nh_off,
                  sport, dport, udp_payload)
