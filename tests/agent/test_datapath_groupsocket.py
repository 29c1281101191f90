"""GroupSocket (the embedded trio API) and the loss test, over loopback multicast."""

from __future__ import annotations

import os
import struct

import pytest
import trio
from test_datapath_relay import Pair, drain, injector, recv_one, sniffer

from agent.datapath.engine import ReceiveOnly
from groupsec.errors import LocalProtocolError

KEY = ("g", "")


async def test_groupsocket_send_and_receive() -> None:
    p = Pair()
    sniff = sniffer(p.group, p.encap)
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        async with p.sender.open_socket(KEY, sport=40000) as tx, p.receiver.open_socket(KEY) as rx:
            secret = b"embedded-" + os.urandom(8).hex().encode()
            await tx.send(secret)
            with trio.fail_after(2):
                dg = await rx.receive()
            assert dg.payload == secret
            assert (dg.src, dg.sport, dg.dport) == ("127.0.0.1", 40000, p.port)
            # the relay's application on the receiver got it too (every interface of the group)
            assert await recv_one(p.app_rx_r) == secret
            await trio.sleep(0.05)
            wire = drain(sniff)
            assert len(wire) == 1
            assert secret not in wire[0]
            # a datagram for another port of the group is not this socket's
            assert tx.statistics()["sent"] == 1
            assert rx.statistics()["received"] == 1
            # a receive-only member gets a typed error, and nothing goes out
            with pytest.raises(ReceiveOnly):
                await rx.send(b"nope")
            assert isinstance(ReceiveOnly("x"), LocalProtocolError)
            await trio.sleep(0.05)
            assert drain(sniff) == []
        nursery.cancel_scope.cancel()


async def test_groupsocket_queue_is_bounded() -> None:
    p = Pair()
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        async with p.receiver.open_socket(KEY, queue=4) as rx:
            for i in range(10):
                p.app.send(b"m%d" % i)
            await trio.sleep(0.3)
            st = rx.statistics()
            assert st["queued"] == 4
            assert st["drops"] == {"queue-full": 6}
            got = [(await rx.receive()).payload for _ in range(4)]
            assert got == [b"m0", b"m1", b"m2", b"m3"]
        with pytest.raises(LocalProtocolError):
            p.receiver.open_socket(("nope", ""))
        nursery.cancel_scope.cancel()


async def test_groupsocket_ignores_forged_plaintext() -> None:
    p = Pair()
    inj = injector()
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        async with p.receiver.open_socket(KEY) as rx:
            inj.sendto(b"plain", (p.group, p.port))
            inj.sendto(b"\x00\x00\x10\x01" + os.urandom(40), (p.group, p.encap))
            with trio.move_on_after(0.3):
                await rx.receive()
                pytest.fail("a GroupSocket received unprotected or foreign data")
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_loss_10000_packets_at_1000_pps() -> None:
    p = Pair()
    total, rate = 10_000, 1000.0
    seen = bytearray(total)
    received = 0
    all_in = trio.Event()

    async def receive() -> None:
        nonlocal received
        sock = p.app_rx_r
        while True:
            await trio.lowlevel.wait_readable(sock)
            for data in drain(sock):
                (i,) = struct.unpack_from("!I", data)
                assert data[4:] == filler
                if not seen[i]:
                    seen[i] = 1
                    received += 1
            if received == total:
                all_in.set()

    filler = os.urandom(1000)
    async with trio.open_nursery() as nursery:
        await p.start(nursery)
        nursery.start_soon(receive)
        start = trio.current_time()
        burst = 10
        for k in range(0, total, burst):
            for i in range(k, k + burst):
                p.app.send(struct.pack("!I", i) + filler)
            await trio.sleep_until(start + (k + burst) / rate)
        with trio.move_on_after(3):
            await all_in.wait()
        st = p.receiver.statistics()["groups"]["g"]
        nursery.cancel_scope.cancel()
    assert received == total, f"lost {total - received} of {total}"
    assert st["drops"] == {}
    assert st["sas"][0]["drops"] == {}  # 0 authentication failures, 0 replays
    assert st["rx_packets"] == total
