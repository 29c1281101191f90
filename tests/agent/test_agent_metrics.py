"""`groupsec-agent run --metrics-port --log-format json`: a real controller and two real agents
(sender, receiver) over loopback multicast. The agents' /metrics must count exactly the packets
sent through them, show a tampered packet as auth-failed and a duplicated one as a replay, and
follow a rekey; no log line of the whole cycle (at DEBUG) contains key bytes."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from agent_helpers import GroupDef, drain, free_port, udp_socket, wait_for
from metrics_helpers import MetricsAgent, MetricsController, key_bytes, leaked_keys, total, value
from test_agent_loopback import sniffer

from groupsec.controller.store import SQLiteStore

N = 40
MARK = b"METRICS-"


def inject(group: str, port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        for d in datagrams:
            s.sendto(d, (group, port))


@pytest.mark.slow
def test_agent_metrics_count_packets_drops_rekeys_and_logs_hold_no_keys(tmp_path):
    g = GroupDef("video")
    ctl = MetricsController(tmp_path, [g], heartbeat=30.0)
    bundles = {"alice": ctl.add_member("alice", "video:sender"), "bob": ctl.add_member("bob", "video:receiver")}
    port = ctl.start()
    relay = {n: (free_port(), free_port()) for n in bundles}
    agents = {n: MetricsAgent(tmp_path, n, b, f"127.0.0.1:{port}",
                              [{"name": "video", "role": "sender" if n == "alice" else "receiver",
                                "relay_listen": f"127.0.0.1:{relay[n][0]}",
                                "relay_deliver": f"127.0.0.1:{relay[n][1]}"}]) for n, b in bundles.items()}
    app = udp_socket(("127.0.0.1", relay["bob"][1]))
    spy = sniffer(g.dst, g.encap)
    try:
        for a in agents.values():
            a.start()
        for a in agents.values():
            a.wait_registered("video")
        alice, bob = agents["alice"], agents["bob"]
        wait_for(lambda: value(bob.metrics(), "groupsec_agent_registered") == 1, 10, "bob's exporter")
        m0 = bob.metrics()
        assert value(m0, "groupsec_agent_packets_total", group="video", level="", direction="rx") == 0
        assert value(m0, "groupsec_agent_drops_total", group="video", level="", stage="engine",
                     reason="auth-failed") == 0

        payloads = [MARK + str(i).encode() for i in range(N)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for p in payloads:
                s.sendto(p, ("127.0.0.1", relay["alice"][0]))
        assert sorted(drain(app)) == sorted(payloads)
        wire = [d for d in drain(spy, quiet=0.3) if len(d) > 40]
        assert len(wire) >= N

        ma, mb = alice.metrics(), bob.metrics()
        assert value(ma, "groupsec_agent_packets_total", group="video", level="", direction="tx") == N
        assert total(ma, "groupsec_agent_sa_packets_total", direction="out") == N
        assert value(ma, "groupsec_agent_bytes_total", group="video", level="", direction="tx") == sum(map(len, payloads))
        assert value(mb, "groupsec_agent_packets_total", group="video", level="", direction="rx") == N
        assert total(mb, "groupsec_agent_sa_packets_total", direction="in") == N
        assert value(mb, "groupsec_agent_auth_failures_total", group="video", level="") == 0

        # one packet with a fresh sequence number (else it is a replay, refused before the ICV check)
        # and a flipped bit in its ICV, and one exact duplicate: both reach bob's wire socket
        bad = bytearray(wire[0])  # ESP-in-UDP: the UDP payload starts with SPI, sequence number
        bad[4:8] = (1 << 20).to_bytes(4, "big")
        bad[-1] ^= 0x01
        inject(g.dst, g.encap, [bytes(bad), wire[1]])
        mb = wait_for(lambda: (m := bob.metrics()) and total(m, "groupsec_agent_drops_total", stage="engine") >= 2
                      and m, 10, "bob to count two drops")
        drops = {"auth-failed": 1, "replay": 1, "unknown-spi": 0, "malformed": 0}
        for reason, n in drops.items():
            assert value(mb, "groupsec_agent_drops_total", group="video", level="", stage="engine", reason=reason) == n
        assert value(mb, "groupsec_agent_auth_failures_total", group="video", level="") == 1
        assert value(mb, "groupsec_agent_replays_total", group="video", level="") == 1
        assert value(mb, "groupsec_agent_packets_total", group="video", level="", direction="rx") == N
        assert drain(app, quiet=0.2) == []

        # a rekey: accepted by bob, his epoch/message-ID gauges follow his status file
        accepted = value(mb, "groupsec_agent_rekeys_accepted_total")
        msg_id = value(mb, "groupsec_agent_msg_id", group="video", level="")
        ctl.cli("rekey", "video")
        mb = wait_for(lambda: (m := bob.metrics()) and value(m, "groupsec_agent_rekeys_accepted_total") > accepted
                      and m, 15, "bob to accept the rekey")
        assert value(mb, "groupsec_agent_msg_id", group="video", level="") == msg_id + 1
        st = wait_for(lambda: (x := bob.group("video")) and x["msg_id"] == msg_id + 1 and x, 5, "bob's status")
        assert value(mb, "groupsec_agent_kek_epoch", group="video", level="") == st["kek_epoch"]
        assert value(mb, "groupsec_agent_sas_installed", group="video", level="", direction="in") == len(
            [sa for sa in st["sas"] if sa["direction"] == "in"])
        assert value(mb, "groupsec_agent_connected") == 1
    finally:
        spy.close()
        app.close()
        for a in agents.values():
            a.stop()
        ctl.stop()

    # the JSON logs: every line one object with the expected fields
    for path in [ctl.log_file, *(a.log_file for a in agents.values())]:
        lines = path.read_text().splitlines()
        assert lines, path
        for line in lines:
            doc = json.loads(line)
            assert {"time", "level", "logger", "message"} <= set(doc), line
    assert any(json.loads(x)["level"] == "DEBUG" for x in bob.log_file.read_text().splitlines())

    # no key the controller made (KEKs, TEKs) appears in any log, in hex or base64
    store = SQLiteStore(ctl.home / "state.db")
    try:
        keys = set().union(*(key_bytes(rec) for _, rec in store.scan("level/")))
    finally:
        store.close()
    assert len(keys) >= 3  # the KEK and at least two generations of TEKs
    assert leaked_keys(keys, [ctl.log_file, *(a.log_file for a in agents.values())]) == []


class FakeSession:
    def statistics(self):
        return {"connected": True, "state": "registered", "counters": {"rekeys_applied": 2},
                "rejected": {"bad-signature": 1}, "groups": []}


class FakeXfrm:
    """The shape XfrmDatapath.statistics() returns (the kernel's per-SA counters)."""

    def statistics(self):
        sa = {"group": "plant", "level": "", "protocol": "esp", "suite": "aes-gcm-16-128", "mode": "transport",
              "dst": "239.2.2.2", "src": None, "seq_out": 0, "seq_in": 0}
        return {"datapath": "xfrm", "groups": 1, "kernel": {"XfrmInStateProtoError": 3},
                "sas": [{**sa, "spi": 0x1001, "direction": "in", "packets": 10, "bytes": 1000,
                         "drops": {"replay": 2, "auth-failed": 1}},
                        {**sa, "spi": 0x1002, "direction": "in", "packets": 5, "bytes": 500,
                         "drops": {"replay": 0, "auth-failed": 4}},
                        {**sa, "spi": 0x2001, "direction": "out", "packets": 7, "bytes": 700,
                         "drops": {"replay": 0, "auth-failed": 0}}]}


def test_xfrm_collector_sums_the_kernel_sa_counters_per_group():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from agent.metrics import agent_registry

    text = generate_latest(agent_registry(FakeSession(), FakeXfrm())).decode()
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for f in text_string_to_metric_families(text) for s in f.samples}
    assert value(m, "groupsec_agent_packets_total", group="plant", level="", direction="rx") == 15
    assert value(m, "groupsec_agent_packets_total", group="plant", level="", direction="tx") == 7
    assert value(m, "groupsec_agent_sa_bytes_total", group="plant", level="", spi="0x00001002", direction="in") == 500
    assert value(m, "groupsec_agent_auth_failures_total", group="plant", level="") == 5
    assert value(m, "groupsec_agent_drops_total", group="plant", level="", stage="kernel", reason="replay") == 2
    assert value(m, "groupsec_agent_kernel_xfrm_errors_total", stat="XfrmInStateProtoError") == 3
    assert value(m, "groupsec_agent_rekeys_accepted_total") == 2
    assert value(m, "groupsec_agent_rekeys_rejected_total", reason="bad-signature") == 1
