"""The unprivileged userspace data path over loopback multicast, with real sockets:
app -> local relay -> ESP-in-UDP -> receiver agent -> app's local port."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest
import trio

from agent.datapath.bench import static_installs
from agent.datapath.relay import RelayConfig
from agent.datapath.userspace import UserspaceConfig, UserspaceDatapath
from groupsec.errors import ConfigError

OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_test_sockets() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


def random_group() -> str:
    b = os.urandom(2)
    return f"239.{200 + b[0] % 50}.{b[1]}.{1 + os.urandom(1)[0] % 250}"


def udp(addr: tuple[str, int] = ("127.0.0.1", 0)) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(addr)
    s.setblocking(False)
    OPEN.append(s)
    return s


def sniffer(group: str, port: int) -> socket.socket:
    """An eavesdropper on the loopback: a plain socket that joined the group on the wire port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((group, port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
    s.setblocking(False)
    OPEN.append(s)
    return s


def injector() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    OPEN.append(s)
    return s


async def recv_one(sock: socket.socket, wait: float = 2.0) -> bytes | None:
    with trio.move_on_after(wait):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(65536)
            except BlockingIOError:
                continue
    return None


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


class Pair:
    """A sender agent and a receive-only agent, each with a relay, on the loopback."""

    def __init__(self, mode: str = "tunnel", suite: str = "aes-gcm-16-128") -> None:
        self.group = random_group()
        self.encap = free_port()
        self.port = free_port()
        self.tx_inst, self.rx_inst = static_installs(self.group, group="g", port=self.port, encap_port=self.encap,
                                                     mode=mode, suite=suite)
        self.app_rx_s = udp()  # the sender host's receiving app
        self.app_rx_r = udp()  # the receiver host's receiving app
        self.sender = UserspaceDatapath(UserspaceConfig(relays={"g": RelayConfig(
            listen=("127.0.0.1", 0), deliver=self.app_rx_s.getsockname())}))
        self.receiver = UserspaceDatapath(UserspaceConfig(relays={"g": RelayConfig(
            listen=("127.0.0.1", 0), deliver=self.app_rx_r.getsockname())}))

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.sender.run)
        await nursery.start(self.receiver.run)
        self.sender.apply(self.tx_inst)
        self.receiver.apply(self.rx_inst)
        self.app = udp()
        addr = self.sender.relay_address(("g", ""))
        assert addr is not None
        self.app.connect(addr)

    def rx_drops(self) -> dict[str, int]:
        return self.receiver.statistics()["groups"]["g"]["drops"]  # type: ignore[no-any-return]

    def rx_sa(self) -> dict[str, object]:
        return self.receiver.statistics()["groups"]["g"]["sas"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("mode", "suite"), [("tunnel", "aes-gcm-16-128"), ("transport", "chacha20-poly1305"),
                                             ("tunnel", "aes-cbc-128-hmac-sha-256")])
async def test_relay_delivers_and_wire_is_not_plaintext(mode: str, suite: str) -> None:
    p = Pair(mode, suite)
    sniff = sniffer(p.group, p.encap)
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        secret = b"TOP-SECRET-PAYLOAD-" + os.urandom(8).hex().encode()
        p.app.send(secret)
        got = await recv_one(p.app_rx_r)
        assert got == secret
        await trio.sleep(0.05)
        wire = drain(sniff)
        assert len(wire) == 1
        # the eavesdropper saw ESP under our SPI, not the application's bytes
        assert struct.unpack("!I", wire[0][:4])[0] == p.tx_inst.outbound.spi  # type: ignore[union-attr]
        assert secret not in wire[0]
        assert secret[:8] not in wire[0]
        # the sender does not deliver its own looped-back packet to itself
        assert await recv_one(p.app_rx_s, 0.2) is None
        st = p.sender.statistics()["groups"]["g"]
        assert st["tx_packets"] == 1
        assert st["wire_stats"]["drops"].get("own") == 1
        rx = p.receiver.statistics()["groups"]["g"]
        assert rx["rx_packets"] == 1
        assert rx["relay"]["delivered"] == 1
        nursery.cancel_scope.cancel()


async def test_bad_datagrams_are_counted_and_path_keeps_running() -> None:
    p = Pair()
    sniff = sniffer(p.group, p.encap)
    inj = injector()
    dst = (p.group, p.encap)
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        p.app.send(b"first")
        assert await recv_one(p.app_rx_r) == b"first"
        await trio.sleep(0.05)
        good = drain(sniff)[0]
        tampered = bytearray(good)
        tampered[4:8] = struct.pack("!I", 1000)  # a fresh sequence number: passes the replay check
        tampered[-20] ^= 0x01
        inj.sendto(bytes(tampered), dst)  # ICV fails
        inj.sendto(good, dst)  # a replay of a packet already accepted
        inj.sendto(b"\x12\x34\x56\x78" + os.urandom(60), dst)  # foreign SPI
        inj.sendto(b"\x01\x02\x03", dst)  # truncated
        inj.sendto(b"\x00\x00\x00\x00plaintext-ike", dst)  # non-ESP marker: not protected
        inj.sendto(good[:20], dst)  # our SPI, cut short
        await trio.sleep(0.2)
        assert drain(p.app_rx_r) == []
        drops = p.rx_drops()
        assert drops.get("auth-failed") == 1
        assert drops.get("replay") == 1
        assert drops.get("unknown-spi") == 1
        assert drops.get("malformed") == 2
        assert drops.get("plaintext") == 1
        sa = p.rx_sa()
        assert sa["drops"] == {"auth-failed": 1, "replay": 1, "malformed": 1}
        assert sa["packets"] == 1
        # still running
        p.app.send(b"second")
        assert await recv_one(p.app_rx_r) == b"second"
        nursery.cancel_scope.cancel()


async def test_plaintext_to_the_group_port_is_counted_not_delivered() -> None:
    p = Pair()
    inj = injector()
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        inj.sendto(b"unprotected", (p.group, p.port))
        await trio.sleep(0.2)
        assert drain(p.app_rx_r) == []
        assert p.rx_drops().get("plaintext") == 1
        nursery.cancel_scope.cancel()


async def test_receive_only_member_refuses_to_send() -> None:
    p = Pair()
    sniff = sniffer(p.group, p.encap)
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        raddr = p.receiver.relay_address(("g", ""))
        assert raddr is not None
        app = udp()
        app.connect(raddr)
        app.send(b"from a receive-only member")
        await trio.sleep(0.2)
        assert drain(sniff) == []  # nothing went out
        assert drain(p.app_rx_s) == []
        st = p.receiver.statistics()["groups"]["g"]
        assert st["relay"]["drops"] == {"receive-only": 1}
        assert st["sender"] is False
        assert st["tx_packets"] == 0
        nursery.cancel_scope.cancel()


async def test_rekey_keeps_state_and_retires_the_old_sa() -> None:
    p = Pair()
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        for i in range(3):
            p.app.send(b"old %d" % i)
            assert await recv_one(p.app_rx_r) == b"old %d" % i
        # re-applying the same install keeps the SA objects (sequence numbers go on)
        p.sender.apply(p.tx_inst)
        p.receiver.apply(p.rx_inst)
        p.app.send(b"old 3")
        assert await recv_one(p.app_rx_r) == b"old 3"
        assert p.rx_sa()["packets"] == 4
        # rollover: a new SA; the receiver knows both for a while, then only the new one
        new_tx, new_rx = static_installs(p.group, group="g", port=p.port, encap_port=p.encap)
        old_sa = p.tx_inst.outbound
        assert old_sa is not None
        from agent.datapath.base import GroupInstall

        p.receiver.apply(GroupInstall(new_rx.policy, inbound=(old_sa, *new_rx.inbound)))
        p.sender.apply(new_tx)
        p.app.send(b"new")
        assert await recv_one(p.app_rx_r) == b"new"
        p.receiver.apply(new_rx)
        p.sender.apply(p.tx_inst)  # a stale sender still on the old SA
        p.app.send(b"stale")
        await trio.sleep(0.2)
        assert drain(p.app_rx_r) == []
        assert p.rx_drops().get("unknown-spi") == 1
        nursery.cancel_scope.cancel()


async def test_remove_group_closes_its_sockets() -> None:
    p = Pair()
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        addr = p.sender.relay_address(("g", ""))
        p.sender.remove_group(("g", ""))
        assert p.sender.statistics()["groups"] == {}
        await trio.sleep(0.01)  # its tasks finish and close their sockets
        # the relay port is free again
        udp(addr).close()  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match="ttl"):
        UserspaceConfig(ttl=0)
    from agent.datapath.sockets import resolve_interface

    with pytest.raises(ConfigError, match="no-such-if0"):
        resolve_interface("no-such-if0")
