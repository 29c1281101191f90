"""Whole IP packets: ESP (RFC 4303) and AH (RFC 4302), transport and tunnel mode, IPv4
and IPv6, and ESP-in-UDP (RFC 3948).

Tunnel mode uses address preservation (RFC 5374 s3.1): the outer header copies the inner
source and the inner multicast destination, and also its TTL/hop limit (which is the
multicast scope) and its DSCP/ECN.
"""

from __future__ import annotations

import os
import struct

from groupsec.errors import (
    AuthenticationFailed,
    BadPacket,
    LocalProtocolError,
    PacketDropped,
    PolicyViolation,
    UnknownSPI,
)
from groupsec.ipsec import udpencap
from groupsec.ipsec.ip import (
    PROTO_AH,
    PROTO_DSTOPTS,
    PROTO_ESP,
    PROTO_HOPOPTS,
    PROTO_IPIP,
    PROTO_IPV6,
    PROTO_ROUTING,
    PROTO_UDP,
    IPInfo,
    addr_to_bytes,
    canonical,
    checksum,
    ipv4_header,
    ipv6_header,
    parse_ip_untrusted,
    udp_checksum,
)
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sad import SAD

_AH = struct.Struct("!BBHII")
_SPI = struct.Struct("!I")
_H = struct.Struct("!H")
_UDP = struct.Struct("!HHHH")
# IPv4 options that AH covers (RFC 4302 appendix A.1), by option number (type & 0x1f)
_IMMUTABLE_V4_OPTS = frozenset((0, 1, 2, 5, 6, 20, 21))

_ident = int.from_bytes(os.urandom(2), "big")


def _next_ident() -> int:
    global _ident
    _ident = (_ident + 1) & 0xFFFF
    return _ident


# --- header helpers ------------------------------------------------------------------------


def _fix_lengths(pkt: bytearray, version: int) -> bytes:
    if version == 4:
        if len(pkt) > 0xFFFF:
            raise BadPacket(f"IPv4 packet of {len(pkt)} bytes exceeds 65535")
        pkt[2:4] = _H.pack(len(pkt))
        hl = (pkt[0] & 0x0F) * 4
        pkt[10:12] = b"\x00\x00"
        pkt[10:12] = _H.pack(checksum(pkt[:hl]))
    else:
        if len(pkt) - 40 > 0xFFFF:
            raise BadPacket("IPv6 payload exceeds 65535")
        pkt[4:6] = _H.pack(len(pkt) - 40)
    return bytes(pkt)


def _outer_header(info: IPInfo, tos: int, proto: int, payload_len: int) -> bytes:
    """Address preservation: inner source, inner group, inner TTL and DSCP/ECN."""
    src, dst = addr_to_bytes(info.src), addr_to_bytes(info.dst)
    if info.version == 4:
        return ipv4_header(src, dst, proto, payload_len, ttl=info.ttl, tos=tos, ident=_next_ident())
    return ipv6_header(src, dst, proto, payload_len, hlim=info.ttl, tclass=tos)


def _zero_mutable(hdr: bytes, version: int) -> bytearray:
    """The IP header (and IPv6 extension headers before AH) with the mutable fields zeroed
    (RFC 4302 s3.3.3.1)."""
    z = bytearray(hdr)
    if version == 4:
        z[1] = 0  # TOS
        z[6:8] = b"\x00\x00"  # flags, fragment offset
        z[8] = 0  # TTL
        z[10:12] = b"\x00\x00"  # checksum
        hl = (z[0] & 0x0F) * 4
        i = 20
        while i < hl:
            t = z[i]
            if t == 0:  # end of options list
                break
            if t == 1:
                i += 1
                continue
            if i + 1 >= hl or z[i + 1] < 2 or i + z[i + 1] > hl:
                raise BadPacket("malformed IPv4 option")
            ln = z[i + 1]
            if (t & 0x1F) not in _IMMUTABLE_V4_OPTS:
                z[i : i + ln] = bytes(ln)
            i += ln
        return z
    z[0] = 0x60
    z[1:4] = b"\x00\x00\x00"  # traffic class, flow label
    z[7] = 0  # hop limit
    nh, off = z[6], 40
    while off < len(z):
        ext_len = (z[off + 1] + 1) * 8
        if nh in (PROTO_HOPOPTS, PROTO_DSTOPTS):
            i, end = off + 2, off + ext_len
            while i < end:
                t = z[i]
                if t == 0:  # Pad1
                    i += 1
                    continue
                if i + 1 >= end or i + 2 + z[i + 1] > end:
                    raise BadPacket("malformed IPv6 option")
                ln = z[i + 1]
                if t & 0x20:  # the option's data may change en route
                    z[i + 2 : i + 2 + ln] = bytes(ln)
                i += 2 + ln
        elif nh == PROTO_ROUTING:
            if z[off + 3] != 0:
                raise BadPacket("AH with a routing header that has segments left is not supported")
        else:
            raise BadPacket(f"IPv6 extension header {nh} before AH is not supported")
        nh = z[off]
        off += ext_len
    return z


def _ah_header_len(sa: SecurityAssociation, version: int) -> int:
    base = 12 + sa.icv_len
    align = 4 if (version == 4 and sa.params.ah_align4) else 8
    return base + (-base) % align


def _ah_seal(sa: SecurityAssociation, hdr: bytearray, version: int, nh: int, payload: bytes, now: float) -> bytes:
    """``hdr`` is the IP header (plus extension headers) whose last next-header byte already
    says AH; lengths are fixed here."""
    ah_len = _ah_header_len(sa, version)
    seq = sa.next_seq(len(payload), now)
    ah = bytearray(ah_len)
    _AH.pack_into(ah, 0, nh, ah_len // 4 - 2, 0, sa.params.spi, seq)
    pkt = bytearray(hdr) + ah + payload
    out = bytearray(_fix_lengths(pkt, version))
    hl = len(hdr)
    icv = sa.icv().compute(_zero_mutable(bytes(out[:hl]), version), ah, payload)
    out[hl + 12 : hl + 12 + sa.icv_len] = icv
    return bytes(out)


# --- protect ------------------------------------------------------------------------------


def protect(sa: SecurityAssociation, ip_packet: bytes, now: float) -> bytes:
    """Apply ``sa`` (outbound) to a whole IP packet; returns the packet to send."""
    info = parse_ip_untrusted(ip_packet)
    p = sa.params
    if info.fragment:
        raise BadPacket("cannot protect a fragment")
    if info.version != p.ip_version:
        raise LocalProtocolError(f"IPv{info.version} packet on an IPv{p.ip_version} SA")
    data = bytes(ip_packet[: info.total_len])
    if p.mode == "tunnel":
        if canonical(info.dst) != canonical(p.dst):
            raise LocalProtocolError(f"packet for {info.dst} on the SA of {p.dst}")
        tos = data[1] if info.version == 4 else ((data[0] & 0x0F) << 4) | (data[1] >> 4)
        inner_nh = PROTO_IPIP if info.version == 4 else PROTO_IPV6
        if p.protocol == "esp":
            core = sa.seal_esp(inner_nh, data, now)
            if p.udp_encap_port is not None:
                return _udp_wrap(info, tos, core, p.udp_encap_port)
            return _outer_header(info, tos, PROTO_ESP, len(core)) + core
        hdr = bytearray(_outer_header(info, tos, PROTO_AH, 0))
        return _ah_seal(sa, hdr, info.version, inner_nh, data, now)
    # transport: ESP/AH go after the IP header (and the IPv6 extension headers that precede it)
    hdr = bytearray(data[: info.insert_off])
    nh = hdr[info.nh_off]
    rest = data[info.insert_off :]
    if p.protocol == "esp":
        core = sa.seal_esp(nh, rest, now)
        if p.udp_encap_port is not None:
            hdr[info.nh_off] = PROTO_UDP
            port = p.udp_encap_port
            udp = bytearray(_UDP.pack(port, port, 8 + len(core), 0) + core)
            udp[6:8] = _H.pack(udp_checksum(addr_to_bytes(info.src), addr_to_bytes(info.dst), udp))
            return _fix_lengths(hdr + udp, info.version)
        hdr[info.nh_off] = PROTO_ESP
        return _fix_lengths(hdr + core, info.version)
    hdr[info.nh_off] = PROTO_AH
    return _ah_seal(sa, hdr, info.version, nh, rest, now)


def _udp_wrap(info: IPInfo, tos: int, core: bytes, port: int) -> bytes:
    src, dst = addr_to_bytes(info.src), addr_to_bytes(info.dst)
    udp = bytearray(_UDP.pack(port, port, 8 + len(core), 0) + core)
    udp[6:8] = _H.pack(udp_checksum(src, dst, udp))
    return _outer_header(info, tos, PROTO_UDP, len(udp)) + bytes(udp)


# --- unprotect ----------------------------------------------------------------------------


def unprotect_untrusted(sad: SAD, ip_packet: bytes | memoryview, now: float) -> tuple[bytes, SecurityAssociation]:
    """Verify and remove ESP/AH. Returns the restored transport-mode packet, or the inner
    packet of a tunnel, and the SA. Raises only ``GroupSecError`` subclasses."""
    try:
        info = parse_ip_untrusted(ip_packet)
        if info.fragment:
            raise BadPacket("IPsec fragment (reassemble first)")
    except BadPacket as exc:
        sad.count_drop(exc.reason)
        raise
    data = bytes(ip_packet[: info.total_len])
    off = info.header_len
    if info.proto == PROTO_ESP:
        return _unprotect_esp(sad, info, data, off, off, now)
    if info.proto == PROTO_UDP and info.udp_payload is not None:
        if len(info.udp_payload) >= 8 and udpencap.classify_untrusted(info.udp_payload) == "esp":
            spi = _SPI.unpack_from(info.udp_payload)[0]
            try:
                sa = sad.lookup(spi, info.dst, info.src)
            except UnknownSPI:
                pass
            else:
                if sa.params.udp_encap_port == info.dport:
                    return _unprotect_esp(sad, info, data, off + 8, off, now, sa)
        sad.count_drop(BadPacket.reason)
        raise BadPacket("UDP packet is not ESP-in-UDP for a known SA")
    if info.proto == PROTO_AH:
        return _unprotect_ah(sad, info, data, off, now)
    sad.count_drop(BadPacket.reason)
    raise BadPacket(f"not an IPsec packet (protocol {info.proto})")


def _lookup(sad: SAD, info: IPInfo, data: bytes, off: int, protocol: str) -> SecurityAssociation:
    if len(data) < off + 8:
        sad.count_drop(BadPacket.reason)
        raise BadPacket(f"{protocol.upper()} header truncated")
    spi = _SPI.unpack_from(data, off + (4 if protocol == "ah" else 0))[0]
    sa = sad.lookup(spi, info.dst, info.src)
    if sa.params.protocol != protocol:
        sad.count_drop(UnknownSPI.reason)
        raise UnknownSPI(f"SPI {spi:#x} is not an {protocol.upper()} SA")
    return sa


def _unprotect_esp(sad: SAD, info: IPInfo, data: bytes, esp_off: int, ip_end: int, now: float,
                   sa: SecurityAssociation | None = None) -> tuple[bytes, SecurityAssociation]:
    if sa is None:
        sa = _lookup(sad, info, data, esp_off, "esp")
        if sa.params.udp_encap_port is not None:
            exc = BadPacket("raw ESP on an SA that expects ESP-in-UDP")
            sa.count_drop(exc)
            raise exc
    nh, payload, _sender = sa.open_esp_untrusted(memoryview(data)[esp_off:], now)
    return _restore(sa, info, data, ip_end, nh, payload)


def _restore(sa: SecurityAssociation, info: IPInfo, data: bytes, ip_end: int, nh: int,
             payload: bytes) -> tuple[bytes, SecurityAssociation]:
    try:
        if sa.params.mode == "tunnel":
            if nh not in (PROTO_IPIP, PROTO_IPV6):
                raise BadPacket(f"tunnel SA carried next header {nh}")
            inner = parse_ip_untrusted(payload)
            if inner.version != (4 if nh == PROTO_IPIP else 6):
                raise BadPacket("inner IP version does not match the next header")
            p = sa.params
            if canonical(inner.dst) != canonical(p.dst) or (p.src is not None and canonical(inner.src) != canonical(p.src)):
                raise PolicyViolation(f"inner packet {inner.src} -> {inner.dst} does not match the SA's selectors")
            return payload[: inner.total_len], sa
        hdr = bytearray(data[:ip_end])
        hdr[info.last_nh_off] = nh
        return _fix_lengths(hdr + payload, info.version), sa
    except PacketDropped as exc:
        sa.count_drop(exc)
        raise


def _unprotect_ah(sad: SAD, info: IPInfo, data: bytes, off: int, now: float) -> tuple[bytes, SecurityAssociation]:
    sa = _lookup(sad, info, data, off, "ah")
    try:
        if len(data) < off + 12:
            raise BadPacket("AH header truncated")
        nh, plen, _res, _spi, seq = _AH.unpack_from(data, off)
        ah_len = (plen + 2) * 4
        icvl = sa.icv_len
        pad = ah_len - 12 - icvl
        if off + ah_len > len(data) or pad < 0 or pad >= 8 or (info.version == 6 and ah_len % 8):
            raise BadPacket("bad AH length")
        window = sa.check_inbound(seq, 0, now)
        icv = data[off + 12 : off + 12 + icvl]
        ah_zeroed = data[off : off + 12] + bytes(icvl) + data[off + 12 + icvl : off + ah_len]
        payload = data[off + ah_len :]
        if not sa.icv().verify(icv, _zero_mutable(data[:off], info.version), ah_zeroed, payload):
            raise AuthenticationFailed("ICV mismatch")
        sa.accepted(window, seq, len(payload))
    except PacketDropped as exc:
        sa.count_drop(exc)
        raise
    return _restore(sa, info, data, off, nh, payload)
