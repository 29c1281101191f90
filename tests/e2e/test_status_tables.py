"""`groupsec status` and `groupsec-agent status` as rich tables (and --json unchanged), against a
real controller and two real agents on loopback; the HA cluster table from a status document."""

from __future__ import annotations

import json
import re

import pytest
from agent_helpers import (
    Controller,
    GroupDef,
    relay_pair,
    run_cli,
    send_paced,
    udp_socket,
    wait_for,
)
from rich.console import Console

from agent.status import render
from groupsec.controller.status_view import tables


def _rows(text: str) -> list[list[str]]:
    """The cells of every table row in rich's box drawing (│ a │ b │)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.strip().startswith("│")]


@pytest.fixture
def world(tmp_path):
    g = GroupDef("video")
    ctl = Controller(tmp_path, [g])
    bundles = {"alice": ctl.add_member("alice", "video:sender"), "bob": ctl.add_member("bob", "video:receiver"),
               "mallory": ctl.add_member("mallory", "video:receiver")}
    port = ctl.start()
    agents, listen, deliver = relay_pair(tmp_path, ctl, port, bundles)
    app = udp_socket(("127.0.0.1", deliver))
    try:
        for a in agents.values():
            a.start()
        for a in agents.values():
            a.wait_registered("video")
        yield ctl, agents, listen
    finally:
        for a in agents.values():
            a.stop()
        ctl.stop()
        app.close()


@pytest.mark.slow
def test_both_status_commands_render_tables_with_the_expected_rows(world) -> None:
    ctl, agents, listen = world
    send_paced(listen, [b"status-table-%d" % i for i in range(7)])
    wait_for(lambda: agents["bob"].datapath_group("video")["rx_packets"] == 7, 10, "bob to receive 7 packets")
    wait_for(lambda: all(m["levels"][0]["msg_id"] is not None for m in ctl.status()["members"]
                         if m["name"] in agents), 10, "both agents to acknowledge")

    doc = json.loads(ctl.cli("status", "--json").stdout)
    assert set(doc) == {"levels", "members", "counters", "sessions", "running"}  # --json unchanged
    out = ctl.cli("status").stdout
    assert out.startswith("controller: running, 2 session(s)")
    rows = _rows(out)
    lv = doc["levels"][0]
    spis = [f"{s:#010x}" for gen in lv["generations"] for s in gen["spis"]]
    group_row = next(r for r in rows if r[0] == "video/-")
    assert group_row[1:4] == [str(lv["msg_id"]), str(lv["kek_epoch"]), "1"]
    assert all(s in out for s in spis)
    members = {r[0]: r for r in rows if r[0] in ("alice", "bob", "mallory")}
    assert set(members) == {"alice", "bob", "mallory"}
    for name in ("alice", "bob"):
        m = next(m for m in doc["members"] if m["name"] == name)["levels"][0]
        assert members[name][1:4] == ["video/-", str(m["epoch"]), str(m["msg_id"])]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", members[name][4])
        assert members[name][5:] == ["ok", "1"]
    assert members["mallory"][1:] == ["video/-", "-", "-", "never", "LAGGING", "0"]

    st = agents["alice"].state
    adoc = json.loads(run_cli("status", "--json", "--state-dir", str(st), module="agent.cli").stdout)
    assert set(adoc) == {"pid", "written", "started", "agent", "datapath", "running"}  # --json unchanged
    text = run_cli("status", "--state-dir", str(st), module="agent.cli").stdout
    assert text.startswith("member alice  state registered")
    assert "group video  sender" in text
    out_sa = next(sa for sa in adoc["agent"]["groups"][0]["sas"] if sa["direction"] == "out")
    row = next(r for r in _rows(text) if r[0] == str(out_sa["spi"]) and r[1] == "out")
    assert row[4] == "7"  # packets sealed under this SA
    assert any(r[0] == "data path userspace: tx_packets" and r[1] == "7" for r in _rows(text))
    bob = run_cli("status", "--state-dir", str(agents["bob"].state), module="agent.cli").stdout
    in_rows = [r for r in _rows(bob) if r[1:2] == ["in"]]
    assert in_rows
    assert sum(int(r[4]) for r in in_rows) == 7


def test_agent_render_is_plain_text_tables() -> None:
    doc = {"pid": 1, "written": 1000.0, "running": False,
           "agent": {"member": "m", "state": "registered", "controller": "c:1", "connected": True,
                     "groups": [{"group": "g", "level": "hi", "role": "receiver", "dst": "239.1.1.1", "msg_id": 4,
                                 "kek_epoch": 2, "sender_id": None,
                                 "sas": [{"spi": "0x0000abcd", "direction": "in", "sender": None, "expires_in": 3.25}]}],
                     "counters": {"registrations": 1}, "rejected": {"replayed": 2}},
           "datapath": {"datapath": "xfrm", "totals": {"rx_packets": 9},
                        "groups": {"g/hi": {"drops": {"replay": 1}, "sas": [{"spi": 0xABCD, "packets": 9, "bytes": 900,
                                                                              "drops": {"replay": 1}}]}}}}
    text = render(doc)
    assert "NOT RUNNING" in text
    rows = _rows(text)
    assert ["0x0000abcd", "in", "-", "3.2s", "9", "900", "replay=1"] in rows
    assert ["rekeys rejected: replayed", "2"] in rows
    assert ["g/hi drops: replay", "1"] in rows


def test_controller_cluster_table() -> None:
    status = {"running": True, "sessions": 0, "levels": [], "members": [],
              "ha": {"controller": "c1", "leader": "c2", "lease_ttl": 5, "etcd_revision": 77,
                     "controllers": [{"name": "c1", "addr": "10.0.0.1:7443", "leader": False, "lag_revisions": 3,
                                      "lag_s": 0.25},
                                     {"name": "c2", "addr": "10.0.0.2:7443", "leader": True, "lag_revisions": 0,
                                      "lag_s": 0.0}]}}
    console = Console(record=True, width=160, color_system=None)
    for r in tables(status):
        console.print(r)
    text = console.export_text()
    assert "cluster: this is c1, leader c2, lease TTL 5 s, etcd revision 77" in text
    rows = _rows(text)
    assert ["c1", "10.0.0.1:7443", "follower", "3", "0.2"] in rows
    assert ["c2", "10.0.0.2:7443", "LEADER", "0", "0.0"] in rows
