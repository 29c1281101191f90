"""Per-group packet state of the userspace data path: the inbound SAD, the outbound SA,
the selector checks and the counters. No sockets, no trio: the relay, the TUN reader,
the raw/encap wires and ``GroupSocket`` all go through one ``GroupEngine``.

Two wire formats:

* ``encap`` (RFC 3948 ESP-in-UDP): the UDP payload is ESP header .. ICV. In tunnel mode
  the protected data is the application's whole IP/UDP packet (address preservation,
  RFC 5374: inner src = the sender, inner dst = the group); in transport mode it is the
  UDP header and payload (next header 17), and the receiver takes the addresses from
  the outer packet.
* ``raw``: a whole IP packet carrying ESP or AH (protocols 50/51), built and opened by
  ``groupsec.ipsec.packet``.

Source-origin authentication (``policy.source_auth`` "sign" / "sign-batched",
docs/PROTOCOL.md): every ESP packet this member seals goes through the group's
``GroupSourceAuth``, which appends the sender's signature trailer; every packet it opens
must carry a valid signature of the sender the SA or sender ID names, else it is dropped
as ``source-auth-failed``. The seal methods therefore return a *list* of datagrams to
send: "sign-batched" holds packets until its window closes (at most ``max_packets``
packets or ``max_delay`` seconds), and the data path calls ``get_timer()`` /
``handle_timer(now)`` and ``flush()`` (before it stops) to release them. Source
authentication is supported on the ``encap`` wire only; a ``raw`` engine refuses it.

``PlainEngine`` has the same interface with protection switched off. It exists for one
purpose: the same-run baseline of ``groupsec bench datapath``.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Literal

from agent.datapath.base import GroupInstall
from groupsec.errors import BadPacket, GroupSecError, LocalProtocolError, PacketDropped, PolicyError
from groupsec.ipsec import ip as ipmod
from groupsec.ipsec import packet as pktmod
from groupsec.ipsec import udpencap
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.policy import GroupPolicy
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sad import SAD
from groupsec.ipsec.sourceauth_group import GroupSourceAuth

Wire = Literal["encap", "raw"]
# (inner IP packet, its UDP payload)
Opened = tuple[Any, Any]

_SPI = struct.Struct("!I")
_V4UDP = struct.Struct("!BBHHHBBH4s4sHHHH")  # an option-less IPv4 header and a UDP header: 28 bytes
# of the same 28 bytes, what the receive check reads: version/IHL, total length, flags/fragment
# offset, protocol, destination, destination port, UDP length
_V4UDP_IN = struct.Struct("!BxH2xHxB2x4x4s2xHH2x")
_PORTS = struct.Struct("!HH")
_PROTO_IPV4 = 4
_PROTO_IPV6 = 41
_PROTO_UDP = 17


class ReceiveOnly(LocalProtocolError):
    """This member has no outbound SA for the group: it may receive but not send.
    (With group keys this is a policy refusal, not protection against forgery.)"""

    reason = "receive-only"


class PlaintextForGroup(PacketDropped):
    """Unprotected traffic reached a protected group (fail closed: dropped and counted)."""

    reason = "plaintext"


class NoSigningKey(LocalProtocolError):
    """A sender of a source-authenticated group holds no signing key: it cannot send."""

    reason = "no-signing-key"


class Keepalive(PacketDropped):
    """An RFC 3948 NAT keepalive: nothing to deliver."""

    reason = "keepalive"


class NotForGroup(PacketDropped):
    """A decrypted or outgoing packet does not match the group's selectors."""

    reason = "selector"


class GroupEngine:
    """The protected state of one group (level). ``now`` is any monotonic clock in seconds."""

    protected = True

    def __init__(self, install: GroupInstall, wire: Wire, src_address: str, now: float, *, ttl: int = 1,
                 max_packets: int | None = None, max_delay: float | None = None) -> None:
        self.policy: GroupPolicy = install.policy
        mode = install.policy.source_auth
        if mode != "none" and wire != "encap":
            raise PolicyError(f"group {install.policy.group!r}: source_auth {mode!r} needs the ESP-in-UDP wire "
                              "(a udp_encap_port); the raw ESP wire does not carry signature trailers")
        limits: dict[str, Any] = {}
        if max_packets is not None:
            limits["max_packets"] = max_packets
        if max_delay is not None:
            limits["max_delay"] = max_delay
        self.sauth = GroupSourceAuth(mode, **limits)
        self._signed = mode != "none"
        self.on_timer_armed: Any = None  # called when a batched window opens (the shell wakes its timer)
        self.wire: Wire = wire
        self.src_address = src_address  # the outer/inner source this member sends from
        self.ttl = ttl  # of the inner packets the relay and GroupSocket build
        self._dst = ipmod.canonical(self.policy.dst)
        self._dst_packed = ipmod.addr_to_bytes(self._dst)
        self._src_packed = ipmod.addr_to_bytes(src_address)
        self._version = 4 if len(self._dst_packed) == 4 else 6
        if len(self._src_packed) != len(self._dst_packed):
            raise LocalProtocolError(f"source {src_address} and group {self._dst} are of different IP versions")
        self._tunnel_nh = _PROTO_IPV4 if self._version == 4 else _PROTO_IPV6
        self._fast_tunnel = wire == "encap" and self._version == 4
        self._any_source: dict[int, SecurityAssociation] = {}
        # the hot paths' SAs (ESP-in-UDP, IPv4, tunnel mode, no source authentication): the
        # outbound SA, or None; the inbound any-source SAs by SPI. Set by apply().
        self._fast_out: SecurityAssociation | None = None
        self._fast_in: dict[int, SecurityAssociation] = {}
        self._ident = int.from_bytes(os.urandom(2), "big")
        # the IPv4 header checksum without its total length (which is all that changes)
        self._v4_sum = sum(struct.unpack("!10H", ipmod.ipv4_header(self._src_packed, self._dst_packed, _PROTO_UDP,
                                                                  0, ttl=ttl)[:10] + b"\0\0" +
                                         self._src_packed + self._dst_packed)[:10]) - 20 if self._version == 4 else 0
        self.sad = SAD()
        self.inbound: dict[int, SecurityAssociation] = {}
        self.outbound: SecurityAssociation | None = None
        self.drops: dict[str, int] = {}
        self.tx_packets = self.tx_bytes = self.rx_packets = self.rx_bytes = 0
        self.apply(install, now)

    # --- control ---------------------------------------------------------------------

    def apply(self, install: GroupInstall, now: float) -> None:
        """Reconcile with ``install``: unchanged SAs keep their replay windows and sequence numbers."""
        if install.policy.key != self.policy.key or install.policy.dst != self.policy.dst:
            raise LocalProtocolError("an install for another group (or group address) was applied to this engine")
        if install.policy.source_auth != self.policy.source_auth:
            raise LocalProtocolError("source_auth changed: the data path must start this group's engine anew")
        self.policy = install.policy
        pol = self.policy
        # the inline receive check: the port a UDP packet must have (-1: let _check_inner decide)
        self._port_fast = pol.port if pol.port is not None and pol.ip_proto in (None, _PROTO_UDP) else -1
        wanted: dict[int, SAParams] = {}
        for p in install.inbound:
            if p.dst != self.policy.dst:
                raise LocalProtocolError(f"inbound SA {p.spi:#x} is for {p.dst}, not {self.policy.dst}")
            wanted[p.spi] = p
        for spi, sa in list(self.inbound.items()):
            if wanted.get(spi) != sa.params:
                self.sad.remove(spi, self._dst, sa.params.src)
                del self.inbound[spi]
                self.sauth.forget(spi)
        if self._signed:
            # a sender no longer listed is revoked from this moment on (its cached windows too)
            self.sauth.update(install.sender_keys, install.owners, install.signing_key)
        for spi, p in wanted.items():
            if spi not in self.inbound:
                sa = SecurityAssociation(p, "in", now)
                self.sad.add(sa)
                self.inbound[spi] = sa
        # SPIs with one any-source SA: found without the SAD's (spi, dst, src) probing
        srcs: dict[int, list[SecurityAssociation]] = {}
        for sa in self.inbound.values():
            srcs.setdefault(sa.params.spi, []).append(sa)
        self._any_source = {spi: v[0] for spi, v in srcs.items() if len(v) == 1 and v[0].params.src is None}
        out = install.outbound
        if out is None:
            self.outbound = None
        elif self.outbound is None or self.outbound.params != out:
            if out.dst != self.policy.dst:
                raise LocalProtocolError(f"outbound SA {out.spi:#x} is for {out.dst}, not {self.policy.dst}")
            self.outbound = SecurityAssociation(out, "out", now)
        fast = self._fast_tunnel and not self._signed
        self._fast_in = {spi: sa for spi, sa in self._any_source.items() if sa.params.mode == "tunnel"} if fast else {}
        self._fast_out = self.outbound if fast and self.outbound is not None and \
            self.outbound.params.mode == "tunnel" else None

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def count_drop(self, exc: GroupSecError) -> None:
        self._drop(exc.reason)

    # --- outbound ----------------------------------------------------------------------

    def _out(self) -> SecurityAssociation:
        sa = self.outbound
        if sa is None:
            raise ReceiveOnly(f"group {self.policy.group!r}: this member is receive-only (no outbound SA)")
        return sa

    def seal_payload(self, payload: bytes | memoryview, sport: int, dport: int, now: float) -> list[bytes]:
        """Protect an application's UDP payload (from the relay or a GroupSocket). Returns the
        datagrams to send now: one, or with "sign-batched" none or a whole window."""
        n = len(payload)
        sa = self._fast_out
        if sa is not None and n <= 65507:
            # _inner_udp inline (the hot path of the relay and GroupSocket); the one's complement
            # sum of the header is folded with a modulo: c > 0, so (c - 1) % 0xFFFF + 1 is the fold
            ident = self._ident = self._ident % 0xFFFF + 1
            c = (self._v4_sum + 27 + n + ident) % 0xFFFF + 1
            data = sa.seal_esp(_PROTO_IPV4, _V4UDP.pack(0x45, 0, 28 + n, ident, 0, self.ttl, _PROTO_UDP, ~c & 0xFFFF,
                                                        self._src_packed, self._dst_packed, sport, dport, 8 + n, 0)
                               + payload, now)
            self.tx_packets += 1
            self.tx_bytes += n
            return [data]
        sa = self.outbound
        if sa is None:
            raise ReceiveOnly(f"group {self.policy.group!r}: this member is receive-only (no outbound SA)")
        if self._signed:
            inner = self._inner_udp(payload, sport, dport)
            if sa.params.mode == "tunnel":
                out = self._sign(sa, self._tunnel_nh, inner, now)
            else:
                out = self._sign(sa, _PROTO_UDP, inner[20 if self._version == 4 else 40:], now)
            self.tx_packets += 1
            self.tx_bytes += n
            return out
        if self._fast_tunnel and n <= 65507 and sa.params.mode == "tunnel":
            # _inner_udp inline (the hot path of the relay and GroupSocket)
            ident = self._ident = self._ident % 0xFFFF + 1
            c = self._v4_sum + 28 + n + ident
            c = (c & 0xFFFF) + (c >> 16)
            c = (c & 0xFFFF) + (c >> 16)
            data = sa.seal_esp(_PROTO_IPV4, _V4UDP.pack(0x45, 0, 28 + n, ident, 0, self.ttl, _PROTO_UDP, ~c & 0xFFFF,
                                                        self._src_packed, self._dst_packed, sport, dport, 8 + n, 0)
                               + payload, now)
        else:
            data = self._seal_ip(sa, self._inner_udp(payload, sport, dport), now)
        self.tx_packets += 1
        self.tx_bytes += n
        return [data]

    def seal_packet(self, pkt: bytes, now: float) -> list[bytes]:
        """Protect a real IP packet (read from the TUN device)."""
        sa = self._out()
        info = ipmod.parse_ip_untrusted(pkt)
        if info.dst != self._dst or not self._selector_ok(info.proto, info.dport):
            raise NotForGroup("packet does not match the group's selectors")
        if sa.params.mode == "transport" and self.wire == "encap":
            if info.proto != _PROTO_UDP or info.fragment:
                raise NotForGroup("transport-mode ESP-in-UDP carries unfragmented UDP only")
            out = self._sign(sa, _PROTO_UDP, bytes(info.payload), now) if self._signed else \
                [sa.seal_esp(_PROTO_UDP, info.payload, now)]
        elif self._signed:
            out = self._sign(sa, self._tunnel_nh, pkt, now)  # encap wire only (checked at start)
        else:
            out = [self._seal_ip(sa, pkt, now)]
        self.tx_packets += 1
        self.tx_bytes += len(pkt)
        return out

    def _sign(self, sa: SecurityAssociation, nh: int, payload: bytes, now: float) -> list[bytes]:
        """Seal through the group's source authentication (ESP-in-UDP: the datagram is P || T)."""
        sauth = self.sauth
        if not sauth.can_sign:
            raise NoSigningKey(f"group {self.policy.group!r}: source_auth {sauth.mode!r} and no signing key "
                               "in this sender's grant")
        idle = sauth.get_timer() is None
        out = sauth.seal(sa, nh, payload, now)
        if idle and self.on_timer_armed is not None and sauth.get_timer() is not None:
            self.on_timer_armed()
        return out

    # --- source authentication timers (the shell calls these) ------------------------------

    def get_timer(self) -> float | None:
        """When the open "sign-batched" window must close (None: nothing waits)."""
        return self.sauth.get_timer() if self._signed else None

    def handle_timer(self, now: float) -> list[bytes]:
        """The packets of a window whose ``max_delay`` has passed, ready to send."""
        return self.sauth.handle_timer(now) if self._signed else []

    def flush(self) -> list[bytes]:
        """Close the open window now (before the data path stops or drops this engine)."""
        return self.sauth.flush() if self._signed else []

    def _inner_udp(self, payload: bytes | memoryview, sport: int, dport: int) -> bytes:
        """The application's datagram as an IP/UDP packet from this member to the group.

        IPv4: the header checksum is updated for the length alone, and the UDP checksum is
        0 ("none", RFC 768): the packet travels under the ESP/AH ICV, which is stronger,
        and a receiver's kernel accepts it from a TUN device. IPv6 requires the checksum.
        """
        n = len(payload)
        if self._version != 4 or n > 65507:
            return ipmod.build_udp_packet(self.src_address, self._dst, sport, dport, bytes(payload), ttl=self.ttl)
        # a non-zero IP ID: with IP_HDRINCL Linux replaces an ID of 0, which AH's ICV covers
        ident = self._ident = self._ident % 0xFFFF + 1
        c = self._v4_sum + 28 + n + ident
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        return _V4UDP.pack(0x45, 0, 28 + n, ident, 0, self.ttl, _PROTO_UDP, ~c & 0xFFFF, self._src_packed,
                           self._dst_packed, sport, dport, 8 + n, 0) + payload

    def _seal_ip(self, sa: SecurityAssociation, pkt: bytes, now: float) -> bytes:
        if self.wire == "raw":
            return pktmod.protect(sa, pkt, now)
        if sa.params.mode == "tunnel":
            return sa.seal_esp(self._tunnel_nh, pkt, now)
        return sa.seal_esp(_PROTO_UDP, pkt[20 if self._version == 4 else 40:], now)  # our own UDP packet

    # --- inbound -----------------------------------------------------------------------

    def _selector_ok(self, proto: int, dport: int | None) -> bool:
        pol = self.policy
        if pol.ip_proto is not None and proto != pol.ip_proto:
            return False
        return pol.port is None or dport == pol.port

    def open_encap_untrusted(self, data: bytes | memoryview, outer_src: str, now: float) -> Opened:
        """Open one ESP-in-UDP datagram. Returns (inner IP packet, UDP payload, parsed header).

        Raises a ``PacketDropped`` (counted by the caller through ``count_drop``).
        """
        spi = _SPI.unpack_from(data)[0] if len(data) >= 8 else 0
        sa = self._fast_in.get(spi)
        if sa is not None:
            # the hot path: an any-source tunnel SA, no source authentication; the common inner
            # packet inline (an option-less, unfragmented IPv4/UDP packet to the group)
            nh, pkt, _sender = sa.open_esp_untrusted(data, now)
            n = len(pkt)
            if nh == _PROTO_IPV4 and n >= 28:
                vhl, total, ff, proto, dst, dport, ulen = _V4UDP_IN.unpack_from(pkt)
                if vhl == 0x45 and proto == _PROTO_UDP and total == n and not ff & 0x3FFF and \
                        8 <= ulen <= n - 20 and dst == self._dst_packed and dport == self._port_fast:
                    self.rx_packets += 1
                    self.rx_bytes += n
                    return pkt, pkt[28 : 20 + ulen]
            if nh != _PROTO_IPV4:
                raise NotForGroup(f"tunnel SA carried next header {nh}")
            return self._check_inner(pkt)
        if not spi:
            if udpencap.classify_untrusted(data) == "keepalive":  # raises BadPacket when too short
                raise Keepalive("NAT keepalive")
            raise PlaintextForGroup("non-ESP datagram on the encapsulation port")
        sa = self._any_source.get(spi) or self.sad.lookup(spi, self._dst, outer_src)
        if self._signed:
            nh, pkt, _sender = self.sauth.opener(sa).open_esp_untrusted(data, now)
        else:
            nh, pkt, _sender = sa.open_esp_untrusted(data, now)
        if nh == _PROTO_IPV4 and sa.params.mode == "tunnel":
            # the common case inline: an option-less, unfragmented IPv4/UDP packet to the group
            n = len(pkt)
            if n >= 28 and pkt[0] == 0x45:
                _, _, total, _, ff, _, proto, _, _, dst, _, dport, ulen, _ = _V4UDP.unpack_from(pkt)
                if proto == _PROTO_UDP and total == n and not ff & 0x3FFF and 8 <= ulen <= n - 20 and \
                        dst == self._dst_packed and dport == self._port_fast:
                    self.rx_packets += 1
                    self.rx_bytes += n
                    return pkt, memoryview(pkt)[28 : 20 + ulen]
            return self._check_inner(pkt)
        if sa.params.mode == "tunnel":
            if nh != self._tunnel_nh:
                raise NotForGroup(f"tunnel SA carried next header {nh}")
        elif nh == _PROTO_UDP:
            pkt = self._udp_from_segment(outer_src, pkt)
        else:
            raise NotForGroup(f"transport-mode ESP-in-UDP carried next header {nh}, not UDP")
        return self._check_inner(pkt)

    def _udp_from_segment(self, src: str, seg: bytes) -> bytes:
        if len(seg) < 8:
            raise BadPacket("truncated UDP header")
        sport, dport = _PORTS.unpack_from(seg, 0)
        return ipmod.build_udp_packet(src, self.policy.dst, sport, dport, seg[8:])

    def open_raw_untrusted(self, pkt: bytes | memoryview, now: float) -> Opened:
        """Open one ESP/AH IP packet (from a raw socket)."""
        inner, _sa = pktmod.unprotect_untrusted(self.sad, bytes(pkt), now)
        return self._check_inner(bytes(inner))

    def _check_inner(self, pkt: bytes) -> Opened:
        """RFC 4301 s5.2 step 4: the decrypted packet must match the SA's selectors.
        A fast path for the common case (IPv4, no options, unfragmented UDP); the rest
        goes through ``parse_ip_untrusted``."""
        n = len(pkt)
        if n >= 28 and pkt[0] == 0x45:
            _, _, total, _, ff, _, proto, _, _, dst, _, dport, ulen, _ = _V4UDP.unpack_from(pkt)
            if proto == _PROTO_UDP and total == n and not ff & 0x3FFF and 8 <= ulen <= n - 20:
                pol = self.policy
                if dst != self._dst_packed or (pol.port is not None and dport != pol.port) or \
                        (pol.ip_proto is not None and pol.ip_proto != _PROTO_UDP):
                    raise NotForGroup("decrypted packet does not match the group's selectors")
                self.rx_packets += 1
                self.rx_bytes += n
                return pkt, memoryview(pkt)[28 : 20 + ulen]
        info = ipmod.parse_ip_untrusted(pkt)
        if info.dst != self._dst or not self._selector_ok(info.proto, info.dport):
            raise NotForGroup("decrypted packet does not match the group's selectors")
        self.rx_packets += 1
        self.rx_bytes += n
        return pkt, info.udp_payload if info.udp_payload is not None else info.payload

    def check_plaintext(self, proto: int, dport: int | None) -> bool:
        """True when an unprotected packet to the group would match its selectors."""
        return self._selector_ok(proto, dport)

    # --- statistics --------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        sas = []
        for sa in [*self.inbound.values(), *([self.outbound] if self.outbound else [])]:
            p = sa.params
            sas.append({"spi": p.spi, "direction": sa.direction, "protocol": p.protocol, "suite": p.suite,
                        "mode": p.mode, "sender": p.src, "sender_id": p.sender_id, **sa.statistics()})
        st = {"group": self.policy.group, "level": self.policy.level, "dst": self.policy.dst,
              "wire": self.wire, "protected": True, "sender": self.outbound is not None,
              "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
              "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
              "drops": dict(self.drops), "sas": sas}
        if self._signed:
            st["source_auth"] = self.sauth.statistics()
        return st


class PlainEngine:
    """The same interface with no protection: the plaintext relay baseline of the benchmark.
    Never used for a real group."""

    protected = False
    wire: Wire = "encap"

    def __init__(self, policy: GroupPolicy, src_address: str) -> None:
        self.policy = policy
        self.src_address = src_address
        self.drops: dict[str, int] = {}
        self.tx_packets = self.tx_bytes = self.rx_packets = self.rx_bytes = 0
        self.outbound = True

    def count_drop(self, exc: GroupSecError) -> None:
        self.drops[exc.reason] = self.drops.get(exc.reason, 0) + 1

    def seal_payload(self, payload: bytes | memoryview, sport: int, dport: int, now: float) -> list[Any]:
        self.tx_packets += 1
        self.tx_bytes += len(payload)
        return [payload]

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> list[bytes]:
        return []

    def flush(self) -> list[bytes]:
        return []

    def open_encap_untrusted(self, data: bytes | memoryview, outer_src: str, now: float) -> Opened:
        self.rx_packets += 1
        self.rx_bytes += len(data)
        return data, data

    def statistics(self) -> dict[str, Any]:
        return {"group": self.policy.group, "level": self.policy.level, "dst": self.policy.dst, "wire": "plain",
                "protected": False, "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
                "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes, "drops": dict(self.drops), "sas": []}
