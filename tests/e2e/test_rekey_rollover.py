"""Issue 5 acceptance: zero-loss TEK and KEK rollover under a continuous 1,000 pps stream
(real controller, real agents, userspace data path over loopback multicast)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from agent_helpers import Agent, Controller, GroupDef, Stream, free_port, udp_socket, wait_for


def wire_spis(group: str, port: int, stop: threading.Event, out: dict[int, int]) -> threading.Thread:
    """Count ESP-in-UDP packets per SPI on the wire (the SPI is the first 4 bytes)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((group, port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
    s.settimeout(0.2)

    def loop() -> None:
        with s:
            while not stop.is_set():
                try:
                    data = s.recv(65535)
                except TimeoutError:
                    continue
                if len(data) >= 8:
                    spi = struct.unpack_from("!I", data)[0]
                    out[spi] = out.get(spi, 0) + 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_stream_survives_10_tek_and_2_kek_rollovers_without_loss(tmp_path):
    # rollover every tek_lifetime - dtd = 1.0 s; a KEK rollover every 5 s. ATD 0.6 s leaves the
    # receivers time to install the next SA even on a loaded 2-core CI machine.
    g = GroupDef("video", extra={"tek_lifetime": 1.6, "atd": 0.6, "dtd": 0.6, "kek_lifetime": 5.0})
    ctl = Controller(tmp_path, [g], heartbeat=1.0)
    alice_b = ctl.add_member("alice", "video:sender")
    bob_b = ctl.add_member("bob", "video:receiver")
    port = ctl.start()
    listen, deliver = free_port(), free_port()
    alice = Agent(tmp_path, "alice", alice_b, f"127.0.0.1:{port}",
                  [{"name": "video", "role": "sender", "relay_listen": f"127.0.0.1:{listen}"}]).start()
    bob = Agent(tmp_path, "bob", bob_b, f"127.0.0.1:{port}",
                [{"name": "video", "role": "receiver", "relay_deliver": f"127.0.0.1:{deliver}"}]).start()
    app = udp_socket(("127.0.0.1", deliver), rcvbuf=8 << 20)
    stop = threading.Event()
    spis: dict[int, int] = {}
    try:
        alice.wait_registered("video")
        bob.wait_registered("video")
        first = bob.group("video")
        sniff = wire_spis(g.dst, g.encap, stop, spis)
        stream = Stream(("127.0.0.1", listen), pps=1000)
        stream.collect("bob", app)
        stream.start()

        def done() -> bool:
            st = bob.group("video")
            return bool(st and st["msg_id"] >= first["msg_id"] + 11 and st["kek_epoch"] >= first["kek_epoch"] + 2)
        wait_for(done, 40, "10 TEK and 2 KEK rollovers", interval=0.2)
        time.sleep(0.5)
        stream.stop(settle=1.5)
        stop.set()
        sniff.join(5)
        last = bob.group("video")
        dp = bob.datapath_group("video")
        sender_relay = alice.datapath_group("video")["relay"]
    finally:
        stop.set()
        alice.stop()
        bob.stop()
        ctl.stop()
        app.close()
    assert stream.sent >= 10_000
    lost = stream.lost("bob")
    assert lost == [], (f"{len(lost)} of {stream.sent} lost, first {lost[:5]}, last {lost[-5:]}; "
                        f"sender relay {sender_relay}; receiver relay {dp['relay']}; receiver drops {dp['drops']}")
    assert dp["drops"].get("auth-failed", 0) == 0
    assert dp["drops"].get("replay", 0) == 0
    # the traffic itself moved through the rollovers: at least 11 SPIs carried real packets
    busy = [spi for spi, n in spis.items() if n >= 50]
    assert len(busy) >= 11, spis
    assert last["kek_epoch"] >= first["kek_epoch"] + 2
