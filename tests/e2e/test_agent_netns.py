"""Issue 4 acceptance in network namespaces: a controller, one sender, two receivers and an
eavesdropper share a bridge. Real `groupsec serve` and `groupsec-agent run` processes.

The sender's applications reach both receivers' applications through the local relay and
through TUN mode; the bridge capture holds no plaintext payload; the eavesdropper (no
credentials from this controller) decrypts nothing; a receiver-only member's agent has no
outbound SA and refuses to send (policy, not forgery protection: every member holds the
group key)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from agent_helpers import Agent, Controller, GroupDef, wait_for
from netns import Lan, listener_result, send, skip_unless_netns, start_listener

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RELAY_IN, RELAY_OUT, PORT = 16200, 16201, 5004


@pytest.fixture
def lan() -> Iterator[Lan]:
    skip_unless_netns()
    with Lan() as lan:
        yield lan


def test_controller_sender_two_receivers_and_eavesdropper(lan: Lan, tmp_path) -> None:
    ns_ctl, snd, r1, r2, eve = (lan.add(n) for n in ("ctl", "snd", "rx1", "rx2", "eve"))
    cap = lan.capture()
    b = os.urandom(2)
    # ESP-in-UDP (RFC 3948) on 4500. (Raw ESP from the controller's policy waits for the
    # controller to accept udp_encap_port = 0; the data path's own netns test covers raw ESP/AH.)
    g = GroupDef("video", dst=f"239.{200 + b[0] % 50}.{b[1]}.5", port=PORT, encap=4500,
                 rekey_addr=f"239.{200 + b[0] % 50}.{b[1]}.250", rekey_port=7500)
    ctl = Controller(tmp_path, [g], heartbeat=2.0, rekey_interface="eth0", listen=f"{ns_ctl.address}:7443",
                     hosts=(ns_ctl.address,), netns=ns_ctl.name)
    bundles = {"snd": ctl.add_member("snd", "video:sender"), "rx1": ctl.add_member("rx1", "video:receiver"),
               "rx2": ctl.add_member("rx2", "video:receiver")}
    # the eavesdropper holds a perfectly good bundle, but from another controller's CA
    other = Controller(tmp_path / "other", [GroupDef("video")])
    eve_bundle = other.add_member("eve", "video:receiver")
    ctl.start()
    addr = f"{ns_ctl.address}:7443"
    agents = {}
    for ns, name, role in ((snd, "snd", "sender"), (r1, "rx1", "receiver"), (r2, "rx2", "receiver")):
        agents[name] = Agent(tmp_path, name, bundles[name], addr,
                             [{"name": "video", "role": role, "relay_listen": f"127.0.0.1:{RELAY_IN}",
                               "relay_deliver": f"127.0.0.1:{RELAY_OUT}"}],
                             interface="eth0", netns=ns.name, tun={"name": "gsec0"})
    agents["eve"] = Agent(tmp_path, "eve", eve_bundle, addr,
                          [{"name": "video", "role": "receiver", "relay_deliver": f"127.0.0.1:{RELAY_OUT}"}],
                          interface="eth0", netns=eve.name)
    try:
        for a in agents.values():
            a.start()
        for n in ("snd", "rx1", "rx2"):
            agents[n].wait_registered("video")
        relay_msgs = [f"RELAY-SECRET-{i}-{os.urandom(4).hex()}" for i in range(5)]
        tun_msgs = [f"TUN-SECRET-{i}-{os.urandom(4).hex()}" for i in range(5)]
        expect = len(relay_msgs) + len(tun_msgs)
        listeners = {}
        for ns in (r1, r2):
            listeners[ns.name + "/relay"] = start_listener(ns, "127.0.0.1", RELAY_OUT, expect=expect, seconds=8)
            listeners[ns.name + "/tun"] = start_listener(ns, "0.0.0.0", PORT, group=g.dst, expect=expect, seconds=8)
        eve_relay = start_listener(eve, "127.0.0.1", RELAY_OUT, seconds=5)
        eve_plain = start_listener(eve, "0.0.0.0", PORT, group=f"{g.dst}@{eve.address}", seconds=5)

        send(snd, "127.0.0.1", RELAY_IN, relay_msgs)  # app -> local relay
        send(snd, g.dst, PORT, tun_msgs)  # unmodified app -> plain multicast -> routed into the TUN
        for name, p in listeners.items():
            got = listener_result(p)
            assert sorted(m for m, _ in got) == sorted(relay_msgs + tun_msgs), name

        # the receiver-only member: no outbound SA, and what its apps send goes nowhere
        rx1 = agents["rx1"].group("video")
        assert [sa for sa in rx1["sas"] if sa["direction"] == "out"] == []
        probe = start_listener(r2, "127.0.0.1", RELAY_OUT, seconds=2)
        send(r1, "127.0.0.1", RELAY_IN, ["FORBIDDEN-RELAY"])
        send(r1, g.dst, PORT, ["FORBIDDEN-TUN"])
        assert listener_result(probe) == []
        wait_for(lambda: (agents["rx1"].datapath_group("video")["relay"] or {}).get("drops", {}).get("receive-only"),
                 5, "rx1's receive-only drop")

        assert listener_result(eve_relay) == []
        assert listener_result(eve_plain) == []
        eve_status = agents["eve"].status()
        spi = int(next(sa["spi"] for sa in agents["snd"].group("video")["sas"] if sa["direction"] == "out"), 16)
        rx_stats = {n: agents[n].datapath_group("video") for n in ("rx1", "rx2")}
    finally:
        for a in agents.values():
            a.stop()
        ctl.stop()
    pcap = cap.stop()
    assert b"SECRET" not in pcap
    assert b"FORBIDDEN" not in pcap
    assert pcap.count(spi.to_bytes(4, "big")) >= expect  # the protected packets did cross the bridge
    for n, st in rx_stats.items():
        assert st["rx_packets"] == expect, n
        assert st["tx_packets"] == 0, n
    # the eavesdropper never got a key: TLS refused it, so its agent holds no group at all
    assert eve_status is not None
    assert eve_status["agent"]["groups"] == []
    assert eve_status["agent"]["counters"]["connect_failures"] >= 1
    assert eve_status["agent"]["state"] != "registered"
