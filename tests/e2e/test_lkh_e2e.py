"""Issue 6 acceptance: eviction from a group with an LKH key tree, with real processes (a
controller and five agents, loopback multicast, ESP-in-UDP userspace data path, local relay).

The remaining receivers ignore the controller's unicast RekeyPush (testing hook), so the only
way they can reach the new KEK is the ONE multicast tree rekey; the test then checks that no
agent asked for a Resync and that the controller pushed no per-member KEK grant."""

from __future__ import annotations

import pytest
from agent_helpers import (
    Agent,
    Controller,
    GroupDef,
    free_port,
    stream_through_eviction,
    udp_socket,
    wait_for,
)

RECEIVERS = ("bob", "carol", "dave", "eve")


@pytest.mark.slow
def test_lkh_eviction_one_multicast_rekey_evicted_agent_decrypts_nothing_new(tmp_path):
    g = GroupDef("video", extra={"atd": 0.5, "dtd": 1.0, "key_tree": "lkh", "key_tree_degree": 2})
    ctl = Controller(tmp_path, [g], heartbeat=3.0)  # a heartbeat-silence resync needs 4.5 s without datagrams
    bundles = {"alice": ctl.add_member("alice", "video:sender")}
    for n in RECEIVERS:
        bundles[n] = ctl.add_member(n, "video:receiver")
    port = ctl.start()
    listen = free_port()
    deliver = {n: free_port() for n in RECEIVERS}
    multicast_only = {"ignore_unicast_rekey": True}
    agents = {"alice": Agent(tmp_path, "alice", bundles["alice"], f"127.0.0.1:{port}",
                             [{"name": "video", "role": "sender", "relay_listen": f"127.0.0.1:{listen}"}],
                             testing=multicast_only)}
    for n, p in deliver.items():
        agents[n] = Agent(tmp_path, n, bundles[n], f"127.0.0.1:{port}",
                          [{"name": "video", "role": "receiver", "relay_deliver": f"127.0.0.1:{p}"}],
                          testing=multicast_only)
    apps = {n: udp_socket(("127.0.0.1", p), rcvbuf=8 << 20) for n, p in deliver.items()}
    remaining = ("alice", "bob", "carol", "dave")
    try:
        for n in ("alice", *RECEIVERS):  # one at a time: every join after the second splits a leaf
            agents[n].start().wait_registered("video")

        def level() -> dict:
            return next(x for x in ctl.status()["levels"] if x["group"] == "video")

        # everyone settles on the controller's current message and KEK before the eviction
        lv = level()
        wait_for(lambda: all(agents[n].group("video")["msg_id"] == lv["msg_id"]
                             and agents[n].group("video")["kek_epoch"] == lv["kek_epoch"] for n in agents),
                 15, "all agents at the current msg_id/KEK")
        before = ctl.status()["counters"]
        counters0 = {n: agents[n].status()["agent"]["counters"] for n in agents}
        stream, boundary = stream_through_eviction(ctl, agents, apps, listen, "alice", "eve")
        lv = level()
        after_ctl = ctl.status()["counters"]
        counters1 = {n: agents[n].status()["agent"]["counters"] for n in agents}
        groups = {n: agents[n].group("video") for n in agents}
        eve_status = agents["eve"].status()["agent"]
    finally:
        for a in agents.values():
            a.stop()
        ctl.stop()
        for s in apps.values():
            s.close()
    # the remaining members converged from the multicast tree rekey alone
    for n in remaining:
        assert groups[n]["kek_epoch"] == lv["kek_epoch"] > 0, n
        assert groups[n]["msg_id"] == lv["msg_id"], n
        assert counters1[n]["lkh_applied"] - counters0[n].get("lkh_applied", 0) == 1, n
        assert counters1[n]["resyncs_sent"] == counters0[n]["resyncs_sent"], n
        assert counters1[n]["registrations"] == counters0[n]["registrations"], n
        assert counters1[n]["push_ignored"] >= counters0[n]["push_ignored"] + 2, n  # unicast copies refused
    assert after_ctl.get("resyncs", 0) == before.get("resyncs", 0)
    assert after_ctl.get("kek-grant-pushes", 0) == 0
    assert len({groups[n]["kek_id"] for n in remaining}) == 1
    # traffic kept flowing to the remaining receivers, none to the evicted one after the boundary
    assert stream.sent > boundary + 1500
    for n in ("bob", "carol", "dave"):
        assert stream.lost(n) == [], n
    assert [i for i in stream.got("eve") if i >= boundary] == []
    assert len(stream.got("eve")) > 0  # eve did receive while she was a member
    assert "revoked" in eve_status["last_error"]
    # eve still hears the multicast tree rekey, but her keys derive nothing from it
    assert counters1["eve"].get("lkh_evicted", 0) == 1
    assert groups["eve"]["kek_id"] not in {groups[n]["kek_id"] for n in remaining}
