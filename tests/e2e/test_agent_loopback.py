"""Unprivileged end-to-end: a real controller and three real agents (one sender, two receivers)
over loopback multicast with the UDP-encapsulated data path and the local relay."""

from __future__ import annotations

import json

import pytest
from agent_helpers import (
    Agent,
    Controller,
    GroupDef,
    drain,
    free_port,
    run_cli,
    sniffer,
    udp_socket,
    wait_for,
)
from agent_helpers import send_paced as send

MARK = b"PLAINTEXT-MARKER-"


@pytest.fixture
def world(tmp_path):
    g = GroupDef("video")
    ctl = Controller(tmp_path, [g])
    bundles = {"alice": ctl.add_member("alice", "video:sender"), "bob": ctl.add_member("bob", "video:receiver"),
               "carol": ctl.add_member("carol", "video:receiver")}
    port = ctl.start()
    ports = {n: (free_port(), free_port()) for n in bundles}
    agents = {}
    for name, bundle in bundles.items():
        role = "sender" if name == "alice" else "receiver"
        listen, deliver = ports[name]
        agents[name] = Agent(tmp_path, name, bundle, f"127.0.0.1:{port}",
                             [{"name": "video", "role": role, "relay_listen": f"127.0.0.1:{listen}",
                               "relay_deliver": f"127.0.0.1:{deliver}"}])
    apps = {n: udp_socket(("127.0.0.1", ports[n][1])) for n in bundles}
    for a in agents.values():
        a.start()
    try:
        for a in agents.values():
            a.wait_registered("video")
        yield ctl, g, agents, ports, apps
    finally:
        for a in agents.values():
            a.stop()
        ctl.stop()
        for s in apps.values():
            s.close()


@pytest.mark.slow
def test_sender_reaches_both_receivers_wire_is_encrypted_and_receiver_cannot_send(world):
    _ctl, g, agents, ports, apps = world
    spy = sniffer(g.dst, g.encap)
    payloads = [MARK + str(i).encode() for i in range(50)]
    send(ports["alice"][0], payloads)
    for name in ("bob", "carol"):
        assert sorted(drain(apps[name])) == sorted(payloads), name
    wire = drain(spy, quiet=0.3)
    spy.close()
    assert len(wire) >= 50  # the protected packets were on the wire ...
    assert not any(MARK in pkt for pkt in wire)  # ... and none carries the plaintext

    # the receive-only member's agent has no outbound SA: what its app sends goes nowhere
    bob = agents["bob"].group("video")
    assert [sa for sa in bob["sas"] if sa["direction"] == "out"] == []
    send(ports["bob"][0], [MARK + b"from-bob-" + str(i).encode() for i in range(10)])
    assert drain(apps["carol"], quiet=0.5) == []
    assert drain(apps["alice"], quiet=0.1) == []
    relay = wait_for(lambda: (agents["bob"].datapath_group("video")["relay"] or {}).get("drops", {}).get("receive-only"),
                     5, "bob's receive-only drops")
    assert relay == 10

    # `groupsec-agent status` shows the groups, SAs and counters of the running agent
    out = run_cli("status", "--state-dir", str(agents["alice"].state), module="agent.cli").stdout
    assert "group video  sender" in out
    assert " out " in out
    doc = json.loads(run_cli("status", "--json", "--state-dir", str(agents["bob"].state), module="agent.cli").stdout)
    assert doc["running"] is True
    assert doc["agent"]["groups"][0]["sas"][0]["direction"] == "in"


@pytest.mark.slow
def test_operator_rekey_reaches_every_agent_and_traffic_continues(world):
    ctl, _g, agents, ports, apps = world
    before = {n: {sa["spi"] for sa in a.group("video")["sas"]} for n, a in agents.items()}
    ctl.cli("rekey", "video")

    def rolled() -> bool:
        out = agents["alice"].group("video")
        return out is not None and any(sa["direction"] == "out" and sa["spi"] not in before["alice"]
                                       for sa in out["sas"])
    wait_for(rolled, 10, "alice to switch to the new outbound SA")
    for n in ("bob", "carol"):
        wait_for(lambda n=n: {sa["spi"] for sa in agents[n].group("video")["sas"]} - before[n], 5, f"{n} new SA")
        assert agents[n].group("video")["msg_id"] >= 1
    payloads = [MARK + b"after-" + str(i).encode() for i in range(30)]
    send(ports["alice"][0], payloads)
    for name in ("bob", "carol"):
        assert sorted(drain(apps[name])) == sorted(payloads)
    for a in agents.values():
        dp = a.datapath_group("video")
        assert dp["drops"].get("auth-failed", 0) == 0
        assert dp["drops"].get("replay", 0) == 0


@pytest.mark.slow
def test_agent_finds_the_controller_by_zeroconf(tmp_path):
    # the bundle hint (localhost:7443) is wrong on purpose: only discovery finds the random port
    ctl = Controller(tmp_path, [GroupDef("video")], listen="0.0.0.0:0", advertise=True)
    bundle = ctl.add_member("dora", "video:receiver")
    ctl.start()
    agent = Agent(tmp_path, "dora", bundle, "discover", [{"name": "video", "role": "receiver"}],
                  session={"discovery_timeout": 10.0}).start()
    try:
        grp = agent.wait_registered("video", timeout=30)
        st = agent.status()["agent"]
    finally:
        agent.stop()
        ctl.stop()
    assert grp["sas"]
    assert st["controller"].endswith(f":{ctl.port}")
