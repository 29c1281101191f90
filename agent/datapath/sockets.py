"""Socket plumbing for the userspace data path: interfaces, multicast joins, raw sockets.

This is the only module of the userspace data path that calls ``setsockopt`` for
multicast. Everything returned is non-blocking; the callers drain sockets themselves.

Linux constants that the ``socket`` module does not export are defined here (values from
``include/uapi/linux/in.h`` and ``in6.h``).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from groupsec.errors import ConfigError

IP_MULTICAST_ALL = 49
IP_PKTINFO = 8
IP_ADD_SOURCE_MEMBERSHIP = 39
IPV6_MULTICAST_ALL = 29
MCAST_JOIN_SOURCE_GROUP = 46
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SIOCGIFADDR = 0x8915
IPPROTO_ESP = 50
IPPROTO_AH = 51

_IFREQ = struct.Struct("16sH2s4s8s")  # struct ifreq with a sockaddr_in in the union


@dataclass(frozen=True, slots=True)
class Interface:
    """The interface the data path sends and joins on."""

    name: str
    index: int
    address: str  # an address of this interface in the group's family (the outer source)
    family: int

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def _ipv4_of(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, _IFREQ.pack(name.encode()[:15], 0, b"", b"", b""))
        except OSError:
            return None
    return socket.inet_ntoa(_IFREQ.unpack(res)[3])


def _ipv6_of(name: str) -> list[str]:
    out: list[str] = []
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5] == name:
                    out.append(str(ipaddress.IPv6Address(bytes.fromhex(parts[0]))))
    except OSError:
        pass
    # prefer global addresses over link-local
    out.sort(key=lambda a: ipaddress.IPv6Address(a).is_link_local)
    return out


def _addresses(name: str, family: int) -> list[str]:
    if family == socket.AF_INET:
        a = _ipv4_of(name)
        return [a] if a else []
    return _ipv6_of(name)


def resolve_interface(spec: str | None, family: int = socket.AF_INET) -> Interface:
    """``spec`` is an interface name ("eth0"), one of its addresses, or None for loopback."""
    if spec is None:
        spec = "lo"
    names = [n for _, n in socket.if_nameindex()]
    if spec in names:
        addrs = _addresses(spec, family)
        if not addrs:
            if spec == "lo":
                addrs = ["127.0.0.1" if family == socket.AF_INET else "::1"]
            else:
                raise ConfigError(f"interface {spec!r} has no {'IPv4' if family == socket.AF_INET else 'IPv6'} address")
        return Interface(spec, socket.if_nametoindex(spec), addrs[0], family)
    try:
        want = ipaddress.ip_address(spec)
    except ValueError:
        raise ConfigError(f"interface {spec!r} is neither an interface name ({', '.join(names)}) nor an address") from None
    fam = socket.AF_INET if want.version == 4 else socket.AF_INET6
    for name in names:
        if any(ipaddress.ip_address(a) == want for a in _addresses(name, fam)):
            return Interface(name, socket.if_nametoindex(name), str(want), fam)
    if want.is_loopback:
        return Interface("lo", socket.if_nametoindex("lo"), str(want), fam)
    raise ConfigError(f"no interface has the address {spec}")


def family_of(addr: str) -> int:
    return socket.AF_INET if ipaddress.ip_address(addr).version == 4 else socket.AF_INET6


def _set_buffers(s: socket.socket, rcvbuf: int | None, sndbuf: int | None) -> None:
    """Ask for big buffers; with CAP_NET_ADMIN go past net.core.[rw]mem_max."""
    for size, force, normal in ((rcvbuf, SO_RCVBUFFORCE, socket.SO_RCVBUF), (sndbuf, SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        if not size:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, normal, size)


def join_group(s: socket.socket, group: str, iface: Interface, source: str | None = None) -> None:
    """IGMP/MLD join on ``iface``; a source-specific join when ``source`` is given."""
    g = ipaddress.ip_address(group)
    if g.version == 4:
        if source is None:
            mreq = struct.pack("4s4si", g.packed, socket.inet_aton("0.0.0.0"), iface.index)  # ip_mreqn
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        else:
            # struct ip_mreq_source { imr_multiaddr; imr_interface; imr_sourceaddr }
            mreq = g.packed + socket.inet_aton(iface.address) + ipaddress.IPv4Address(source).packed
            s.setsockopt(socket.IPPROTO_IP, IP_ADD_SOURCE_MEMBERSHIP, mreq)
        return
    if source is None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, g.packed + struct.pack("@I", iface.index))
    else:
        # struct group_source_req { uint32 gsr_interface; (pad) sockaddr_storage group, source }
        def ss(addr: str) -> bytes:
            sin6 = struct.pack("@H", socket.AF_INET6) + struct.pack("!HI", 0, 0) + ipaddress.IPv6Address(addr).packed
            return (sin6 + struct.pack("@I", 0)).ljust(128, b"\0")

        req = struct.pack("@I", iface.index).ljust(8, b"\0") + ss(group) + ss(source)
        s.setsockopt(socket.IPPROTO_IPV6, MCAST_JOIN_SOURCE_GROUP, req)


def set_multicast_tx(s: socket.socket, iface: Interface, ttl: int, loop: bool) -> None:
    """Choose the outgoing interface, the TTL/hop limit and the loopback option."""
    if iface.family == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                     struct.pack("4s4si", socket.inet_aton("0.0.0.0"), socket.inet_aton(iface.address), iface.index))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(loop))
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, iface.index)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(loop))


def _no_multicast_all(s: socket.socket, family: int) -> None:
    """Receive only the groups this socket joined, not every group any socket joined."""
    if family == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)


def open_multicast_rx(group: str, port: int, iface: Interface, source: str | None = None,
                      rcvbuf: int | None = None) -> socket.socket:
    """A UDP socket bound to (group, port) that joined ``group`` on ``iface``."""
    family = family_of(group)
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _no_multicast_all(s, family)
        _set_buffers(s, rcvbuf, None)
        s.bind((group, port))
        join_group(s, group, iface, source)
        s.setblocking(False)
    except OSError as exc:
        s.close()
        raise ConfigError(f"cannot listen on {group} port {port} via {iface.name}: {exc.strerror}") from None
    return s


def open_multicast_tx(group: str, port: int, iface: Interface, ttl: int = 1, loop: bool = True,
                      sndbuf: int | None = None) -> socket.socket:
    """A UDP socket from (iface.address, ephemeral port) connected to (group, port)."""
    family = family_of(group)
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _set_buffers(s, None, sndbuf)
        set_multicast_tx(s, iface, ttl, loop)
        s.bind((iface.address, 0))
        s.connect((group, port))
        s.setblocking(False)
    except OSError as exc:
        s.close()
        raise ConfigError(f"cannot send to {group} port {port} via {iface.name}: {exc.strerror}") from None
    return s


def open_udp(addr: tuple[str, int], rcvbuf: int | None = None, sndbuf: int | None = None) -> socket.socket:
    """A plain non-blocking UDP socket bound to ``addr`` (the relay's local ports)."""
    s = socket.socket(family_of(addr[0]), socket.SOCK_DGRAM)
    try:
        _set_buffers(s, rcvbuf, sndbuf)
        s.bind(addr)
        s.setblocking(False)
    except OSError as exc:
        s.close()
        raise ConfigError(f"cannot bind {addr[0]} port {addr[1]}: {exc.strerror}") from None
    return s


def open_raw_rx(protocol: int, iface: Interface, rcvbuf: int | None = None) -> socket.socket:
    """A raw IPv4 socket receiving every incoming packet of ``protocol`` (50 ESP, 51 AH, 17 UDP),
    IP header included. Needs CAP_NET_RAW."""
    if iface.family != socket.AF_INET:
        raise ConfigError("raw ESP/AH is only implemented for IPv4; use udp_encap_port for IPv6 groups")
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, protocol)
    try:
        _no_multicast_all(s, socket.AF_INET)
        _set_buffers(s, rcvbuf, None)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def open_raw_tx(iface: Interface, sndbuf: int | None = None) -> socket.socket:
    """A raw IPv4 socket that sends whole IP packets (IP_HDRINCL) out of ``iface``."""
    if iface.family != socket.AF_INET:
        raise ConfigError("raw ESP/AH is only implemented for IPv4; use udp_encap_port for IPv6 groups")
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        _set_buffers(s, None, sndbuf)
        # the TTL and loop come from the header we build; the interface from here
        set_multicast_tx(s, iface, 1, False)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def privileged() -> bool:
    """True when this process may open raw sockets (root or CAP_NET_RAW)."""
    if os.geteuid() == 0:
        return True
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP).close()
    except OSError:
        return False
    return True
