"""The network side of the userspace data path: ESP-in-UDP and raw ESP/AH sockets.

Hot path rule (DESIGN.md s7): one ``trio.lowlevel.wait_readable`` per batch, then
non-blocking ``recv_into`` into one preallocated buffer until ``BlockingIOError`` (or
``BATCH`` packets, so that one busy socket cannot starve the other direction).
Nothing here logs per packet; every drop is a counter.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from agent.datapath import sockets as so
from agent.datapath.engine import GroupEngine, PlainEngine
from groupsec.errors import GroupSecError
from groupsec.ipsec import ip as ipmod

BATCH = 256
BUFSIZE = 65536
DEFAULT_RCVBUF = 4 << 20
DEFAULT_SNDBUF = 1 << 20

Deliver = Callable[[Any, Any], None]  # (inner IP packet, its UDP payload)


def count(d: dict[str, int], reason: str) -> None:
    d[reason] = d.get(reason, 0) + 1


def send_counted(sock: socket.socket, data: Any, drops: dict[str, int]) -> bool:
    """Non-blocking send; a full socket buffer is a counted drop, never a wait."""
    try:
        sock.send(data)
    except BlockingIOError:
        count(drops, "tx-full")
        return False
    except OSError:
        count(drops, "tx-error")
        return False
    return True


class EncapWire:
    """RFC 3948 ESP-in-UDP for one group: a receive socket bound to (group, encap port)
    that joined the group on the interface, and a send socket connected to it."""

    def __init__(self, engine: GroupEngine | PlainEngine, iface: so.Interface, port: int, *, ttl: int = 1,
                 loop: bool = True, rcvbuf: int | None = DEFAULT_RCVBUF, sndbuf: int | None = DEFAULT_SNDBUF,
                 clock: Callable[[], float] = time.monotonic) -> None:
        pol = engine.policy
        self.engine = engine
        self.port = port
        self._clock = clock
        self.rx = so.open_multicast_rx(pol.dst, port, iface, pol.src, rcvbuf)
        try:
            self.tx = so.open_multicast_tx(pol.dst, port, iface, ttl, loop, sndbuf)
        except BaseException:
            self.rx.close()
            raise
        self._own = self.tx.getsockname()[:2]
        self.drops: dict[str, int] = {}
        self.rx_datagrams = self.tx_datagrams = 0
        self.deliver: Deliver = lambda pkt, payload: None

    def send(self, data: Any) -> None:
        if send_counted(self.tx, data, self.drops):
            self.tx_datagrams += 1

    async def send_wait(self, data: Any) -> None:
        """For API callers: wait for room in the socket buffer instead of dropping."""
        while True:
            try:
                self.tx.send(data)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.tx)
                continue
            self.tx_datagrams += 1
            await trio.lowlevel.checkpoint()
            return

    async def receive_loop(self) -> None:
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        recvfrom_into = self.rx.recvfrom_into
        engine = self.engine
        open_ = engine.open_encap_untrusted
        own = self._own
        drops = self.drops
        clock = self._clock
        while True:
            await trio.lowlevel.wait_readable(self.rx)
            now = clock()
            for _ in range(BATCH):
                try:
                    n, addr = recvfrom_into(buf)
                except BlockingIOError:
                    break
                except OSError:
                    count(drops, "rx-error")
                    break
                if addr[:2] == own:
                    count(drops, "own")  # our own multicast, looped back
                    continue
                self.rx_datagrams += 1
                try:
                    pkt, payload = open_(view[:n], addr[0], now)
                except GroupSecError as exc:
                    engine.count_drop(exc)
                    continue
                self.deliver(pkt, payload)

    def close(self) -> None:
        self.rx.close()
        self.tx.close()

    def statistics(self) -> dict[str, Any]:
        return {"kind": "udp-encap", "port": self.port, "rx_datagrams": self.rx_datagrams,
                "tx_datagrams": self.tx_datagrams, "drops": dict(self.drops)}


class RawWire:
    """ESP (50) and AH (51) directly in IPv4, shared by every raw-wire group of a data path.

    Receiving: one raw socket per protocol bound to the interface; packets are dispatched
    by their outer destination (the group) to the group's engine. Sending: one
    ``IPPROTO_RAW`` socket (the header comes from ``groupsec.ipsec.packet.protect``).

    Fail closed: a raw UDP socket on the same interface sees every unprotected UDP packet
    that arrives there; one addressed to a protected group and matching its selectors is
    counted as ``plaintext`` in the group's drops. The userspace path never delivers it,
    but it cannot stop the kernel from handing it to an application socket that listens
    on the group's port with IP_MULTICAST_ALL on (the Linux default); only the XFRM data
    path can enforce that.
    """

    def __init__(self, iface: so.Interface, *, rcvbuf: int | None = DEFAULT_RCVBUF,
                 sndbuf: int | None = DEFAULT_SNDBUF, clock: Callable[[], float] = time.monotonic) -> None:
        self.iface = iface
        self._clock = clock
        self.rx: dict[int, socket.socket] = {}
        self.groups: dict[bytes, list[tuple[GroupEngine, Deliver]]] = {}
        self._joined: dict[bytes, int] = {}
        self.drops: dict[str, int] = {}
        self.rx_packets = self.tx_packets = 0
        try:
            for proto in (so.IPPROTO_ESP, so.IPPROTO_AH, socket.IPPROTO_UDP):
                s = so.open_raw_rx(proto, iface, rcvbuf)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.name.encode())
                self.rx[proto] = s
            self.tx = so.open_raw_tx(iface, sndbuf)
        except BaseException:
            self.close()
            raise

    def add_group(self, engine: GroupEngine, deliver: Deliver) -> None:
        key = socket.inet_aton(engine.policy.dst)
        self.groups.setdefault(key, []).append((engine, deliver))
        if not self._joined.get(key):
            # every raw socket joins: with IP_MULTICAST_ALL off, a raw socket only sees its own groups
            for s in self.rx.values():
                so.join_group(s, engine.policy.dst, self.iface, engine.policy.src)
        self._joined[key] = self._joined.get(key, 0) + 1

    def remove_group(self, engine: GroupEngine) -> None:
        key = socket.inet_aton(engine.policy.dst)
        entries = [e for e in self.groups.get(key, []) if e[0] is not engine]
        if entries:
            self.groups[key] = entries
        else:
            self.groups.pop(key, None)
        self._joined[key] = self._joined.get(key, 1) - 1
        if self._joined[key] <= 0:
            self._joined.pop(key, None)
            for s in self.rx.values():
                try:
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, key + socket.inet_aton(self.iface.address))
                except OSError:
                    pass

    def send(self, pkt: bytes) -> None:
        try:
            self.tx.sendto(pkt, (socket.inet_ntoa(pkt[16:20]), 0))
        except BlockingIOError:
            count(self.drops, "tx-full")
            return
        except OSError:
            count(self.drops, "tx-error")
            return
        self.tx_packets += 1

    async def send_wait(self, pkt: bytes) -> None:
        dst = (socket.inet_ntoa(pkt[16:20]), 0)
        while True:
            try:
                self.tx.sendto(pkt, dst)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.tx)
                continue
            self.tx_packets += 1
            await trio.lowlevel.checkpoint()
            return

    async def receive_loop(self, proto: int) -> None:
        sock = self.rx[proto]
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        recv_into = sock.recv_into
        groups = self.groups
        drops = self.drops
        clock = self._clock
        own = socket.inet_aton(self.iface.address)
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = clock()
            for _ in range(BATCH):
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    break
                except OSError:
                    count(drops, "rx-error")
                    break
                if n < 20:
                    count(drops, "malformed")
                    continue
                dst = bytes(view[16:20])
                entries = groups.get(dst)
                if entries is None:
                    continue  # not one of our groups: not ours to judge
                if view[12:16] == own:
                    continue  # our own packet, looped back
                if proto == socket.IPPROTO_UDP:
                    self._plaintext(view[:n], entries)
                    continue
                self.rx_packets += 1
                self._open(view[:n], entries, now)

    @staticmethod
    def _open(pkt: memoryview, entries: list[tuple[GroupEngine, Deliver]], now: float) -> None:
        last: GroupSecError | None = None
        for engine, deliver in entries:
            try:
                inner, payload = engine.open_raw_untrusted(pkt, now)
            except GroupSecError as exc:
                last = exc
                if exc.reason == "unknown-spi" and len(entries) > 1:
                    continue  # maybe another level of the same address
                engine.count_drop(exc)
                return
            deliver(inner, payload)
            return
        if last is not None:
            entries[0][0].count_drop(last)

    @staticmethod
    def _plaintext(pkt: memoryview, entries: list[tuple[GroupEngine, Deliver]]) -> None:
        try:
            info = ipmod.parse_ip_untrusted(pkt)
        except GroupSecError:
            return
        for engine, _ in entries:
            if engine.check_plaintext(info.proto, info.dport):
                count(engine.drops, "plaintext")
                return

    def close(self) -> None:
        for s in self.rx.values():
            s.close()
        tx = getattr(self, "tx", None)
        if tx is not None:
            tx.close()

    def statistics(self) -> dict[str, Any]:
        return {"kind": "raw", "interface": self.iface.name, "rx_packets": self.rx_packets,
                "tx_packets": self.tx_packets, "drops": dict(self.drops)}


class PlaintextGuard:
    """Fail closed on the unprivileged path: a socket bound to the group's own data port
    (the selector port) that joined the group on the wire interface. Whatever unprotected
    UDP reaches it there is counted as ``plaintext`` in the group's drops and discarded;
    relay and GroupSocket applications only ever see what the engine decrypted.

    Packets that arrive on an interface in ``ignore_ifindexes`` (our own TUN device, where
    we write decrypted packets) are not counted.
    """

    def __init__(self, engine: GroupEngine, iface: so.Interface, port: int,
                 ignore_ifindexes: set[int] | None = None) -> None:
        self.engine = engine
        self.ignore = ignore_ifindexes if ignore_ifindexes is not None else set()
        self.sock = so.open_multicast_rx(engine.policy.dst, port, iface, engine.policy.src, 1 << 16)
        v4 = iface.family == socket.AF_INET
        self._level = socket.IPPROTO_IP if v4 else socket.IPPROTO_IPV6
        self._type = so.IP_PKTINFO if v4 else socket.IPV6_PKTINFO
        self.sock.setsockopt(self._level, so.IP_PKTINFO if v4 else socket.IPV6_RECVPKTINFO, 1)
        self.seen = 0

    def _ifindex(self, ancdata: list[tuple[int, int, bytes]]) -> int:
        for level, typ, data in ancdata:
            if level == self._level and typ == self._type:
                # in_pktinfo starts with int ifindex; in6_pktinfo ends with it
                raw = data[:4] if self._level == socket.IPPROTO_IP else data[16:20]
                return int.from_bytes(raw, "little" if socket.htons(1) != 1 else "big")
        return 0

    async def receive_loop(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            for _ in range(BATCH):
                try:
                    _, anc, _, _ = self.sock.recvmsg(0, 64)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if self._ifindex(anc) in self.ignore:
                    continue
                self.seen += 1
                count(self.engine.drops, "plaintext")

    def close(self) -> None:
        self.sock.close()
