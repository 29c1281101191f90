"""Helpers for the kernel tests: two network namespaces joined by a veth pair, entered
with setns(2) from this process (sockets keep the namespace they were created in), a
packet capture (AF_PACKET) and a packet injector, and a parser for `ip xfrm` output.

Topology: namespace ``A`` (veth ``va``: 10.99.0.1/24, fd00:99::1/64) <-> namespace
``B`` (veth ``vb``: 10.99.0.2/24, fd00:99::2/64).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

IN_VM = os.environ.get("GROUPSEC_IN_VM") == "1"
SKIP_REASON = "kernel test: runs only inside the VM (tests/kernel/run_in_vm.py, started by tests/kernel/test_vm.py)"

CLONE_NEWNET = 0x40000000
ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
PACKET_OUTGOING = 4

A, B = "gsk-a", "gsk-b"
ADDR = {A: {4: "10.99.0.1", 6: "fd00:99::1"}, B: {4: "10.99.0.2", 6: "fd00:99::2"}}
DEV = {A: "va", B: "vb"}
GROUP = {4: "239.1.2.3", 6: "ff15::1:2"}

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the body (and create its sockets) inside network namespace ``name``."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(orig)
    finally:
        os.close(target)
        os.close(orig)


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, timeout=30)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(full)} failed: {res.stderr.strip()}")
    return res.stdout


def make_topology() -> None:
    delete_topology()
    sh("ip", "netns", "add", A)
    sh("ip", "netns", "add", B)
    sh("ip", "link", "add", "va", "netns", A, "type", "veth", "peer", "name", "vb", "netns", B)
    for ns in (A, B):
        dev = DEV[ns]
        sh("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{dev}.rp_filter=0",
           "net.ipv6.conf.all.accept_dad=0", ns=ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "addr", "add", ADDR[ns][4] + "/24", "dev", dev, ns=ns)
        sh("ip", "addr", "add", ADDR[ns][6] + "/64", "dev", dev, "nodad", ns=ns)
        sh("ip", "route", "add", "224.0.0.0/4", "dev", dev, ns=ns)


def delete_topology() -> None:
    for ns in (A, B):
        sh("ip", "netns", "del", ns, check=False)


def ifindex(ns: str) -> int:
    with netns(ns):
        return socket.if_nametoindex(DEV[ns])


def multicast_mac(group: str) -> bytes:
    g = ipaddress.ip_address(group).packed
    if len(g) == 4:
        return bytes([1, 0, 0x5E, g[1] & 0x7F, g[2], g[3]])
    return b"\x33\x33" + g[-4:]


# --- sockets ---------------------------------------------------------------------------


def udp_sender(ns: str, version: int) -> socket.socket:
    """A plain UDP socket in ``ns`` that sends multicast out of its veth, no loopback."""
    with netns(ns):
        fam = socket.AF_INET if version == 4 else socket.AF_INET6
        s = socket.socket(fam, socket.SOCK_DGRAM)
        idx = socket.if_nametoindex(DEV[ns])
        if version == 4:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                         struct.pack("4s4si", bytes(4), socket.inet_aton(ADDR[ns][4]), idx))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        s.bind((ADDR[ns][version], 0))
        return s


def udp_receiver(ns: str, version: int, port: int) -> socket.socket:
    """A plain UDP socket in ``ns`` bound to the group and port, joined on its veth."""
    with netns(ns):
        group = GROUP[version]
        idx = socket.if_nametoindex(DEV[ns])
        if version == 4:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((group, port))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                         struct.pack("4s4si", socket.inet_aton(group), bytes(4), idx))
        else:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.bind((group, port, 0, idx))
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                         socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", idx))
        s.setblocking(False)
        return s


def recv_all(s: socket.socket, want: int, timeout: float = 3.0) -> list[tuple[bytes, str]]:
    """Up to ``want`` datagrams, waiting at most ``timeout`` seconds in total."""
    out: list[tuple[bytes, str]] = []
    end = time.monotonic() + timeout
    while len(out) < want:
        left = end - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data, addr = s.recvfrom(65535)
        out.append((data, addr[0]))
    return out


class Capture:
    """Every IP packet that arrives on ``ns``'s veth (AF_PACKET, cooked: no link header)."""

    def __init__(self, ns: str) -> None:
        with netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            self.sock.bind((DEV[ns], ETH_P_ALL))
        self.sock.setblocking(False)

    def packets(self, want: int, timeout: float = 3.0, keep=lambda pkt: True) -> list[bytes]:
        out: list[bytes] = []
        end = time.monotonic() + timeout
        while len(out) < want:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            data, addr = self.sock.recvfrom(65535)
            if addr[2] != PACKET_OUTGOING and addr[1] in (ETH_P_IP, ETH_P_IPV6) and keep(data):
                out.append(data)
        return out

    def close(self) -> None:
        self.sock.close()


def is_ipsec(pkt: bytes) -> bool:
    """ESP or AH (IPv4, or IPv6 without extension headers), or ESP-in-UDP on port 4500."""
    if pkt[0] >> 4 == 4:
        proto, off = pkt[9], (pkt[0] & 0x0F) * 4
    else:
        proto, off = pkt[6], 40
    if proto in (50, 51):
        return True
    return proto == 17 and len(pkt) >= off + 4 and struct.unpack_from("!H", pkt, off + 2)[0] == 4500


class Injector:
    """Sends whole IP packets out of ``ns``'s veth to a multicast MAC (AF_PACKET)."""

    def __init__(self, ns: str) -> None:
        self.dev = DEV[ns]
        with netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM)

    def send(self, pkt: bytes, group: str) -> None:
        proto = ETH_P_IP if pkt[0] >> 4 == 4 else ETH_P_IPV6
        self.sock.sendto(pkt, (self.dev, proto, 0, 0, multicast_mac(group)))

    def close(self) -> None:
        self.sock.close()


# --- `ip xfrm` output: the oracle --------------------------------------------------------


@dataclass
class IpEntry:
    head: str
    body: str

    def __contains__(self, text: str) -> bool:
        return text in self.head or text in self.body


def ip_xfrm(what: str, ns: str, stats: bool = False) -> list[IpEntry]:
    """``ip [-s] xfrm state|policy list`` in ``ns``, split into one entry per SA/policy."""
    out = sh("ip", *(["-s"] if stats else []), "xfrm", what, "list", ns=ns)
    entries: list[IpEntry] = []
    for block in re.split(r"\n(?=\S)", out.strip()):
        if block.strip():
            head, _, body = block.partition("\n")
            entries.append(IpEntry(head.strip(), " ".join(body.split())))
    return entries


def xfrm_stat(ns: str) -> dict[str, int]:
    with netns(ns), open("/proc/thread-self/net/xfrm_stat") as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}


# --- SAs and groups for the tests ------------------------------------------------------

PORT = 5000


def make_sa(suite: str, mode: str, version: int, src: str | None = None, spi: int | None = None, **kw):  # type: ignore[no-untyped-def]
    """An SAParams with fresh random keys for the group of ``version``."""
    import secrets

    from groupsec.ipsec.params import SAParams
    from groupsec.ipsec.suites import get_suite

    s = get_suite(suite)
    return SAParams(spi if spi is not None else 0x1000 + secrets.randbelow(1 << 30), s.protocol, suite, mode,
                    GROUP[version], enc_key=os.urandom(s.enc_key_len), auth_key=os.urandom(s.auth_key_len),
                    src=src, **kw)


def make_policy(suite: str, mode: str, version: int, group: str = "video", **kw):  # type: ignore[no-untyped-def]
    from groupsec.ipsec.policy import GroupPolicy
    from groupsec.ipsec.suites import get_suite

    kw.setdefault("udp_encap_port", None)
    kw.setdefault("port", PORT)
    return GroupPolicy(group, GROUP[version], get_suite(suite).protocol, suite, mode, **kw)


class InNetns:
    """A proxy that runs every method call of ``obj`` inside namespace ``ns`` (XfrmDatapath
    creates its ESP-in-UDP and join sockets at ``apply`` time, in the caller's namespace)."""

    def __init__(self, obj: object, ns: str) -> None:
        self._obj, self._ns = obj, ns

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args, **kw):  # type: ignore[no-untyped-def]
            with netns(self._ns):
                return attr(*args, **kw)

        return call


def datapath(ns: str, **kw) -> InNetns:  # type: ignore[no-untyped-def]
    """An XfrmDatapath living in namespace ``ns``."""
    from agent.datapath.xfrm import XfrmDatapath

    with netns(ns):
        return InNetns(XfrmDatapath(**kw), ns)
