"""`groupsec serve --metrics-port --log-format json`: a real controller process, real TLS agent
sessions; /metrics scraped over HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from agent_helpers import GroupDef
from metrics_helpers import MetricsController, fetch, scrape, value

from agent.config import AgentConfig, GroupSpec, load_bundle
from agent.datapath.base import GroupInstall
from agent.session import AgentSession


class NullDatapath:
    def __init__(self) -> None:
        self.applied: list[GroupInstall] = []

    def apply(self, install: GroupInstall) -> None:
        self.applied.append(install)

    def remove_group(self, key: tuple[str, str]) -> None:
        pass

    def statistics(self) -> dict[str, Any]:
        return {}


def session_for(bundle: Path, port: int, tmp: Path, role: str = "receiver") -> tuple[AgentSession, NullDatapath]:
    cfg = AgentConfig(bundle=bundle, groups=(GroupSpec("video", role),), controller=("127.0.0.1", port),
                      state_dir=tmp / "st", reconnect_min=0.1, reconnect_max=0.4, ack_jitter=0.1)
    dp = NullDatapath()
    return AgentSession(cfg, load_bundle(bundle), dp), dp


async def wait_until(pred: Any, limit: float, what: str) -> Any:
    with trio.fail_after(limit):
        while not (v := pred()):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return v


@pytest.mark.slow
async def test_controller_metrics_follow_registrations_refusals_rekeys_and_acks(tmp_path):
    ctl = MetricsController(tmp_path, [GroupDef("video")], heartbeat=30.0)
    bundles = {n: ctl.add_member(n, f"video:{r}") for n, r in (("alice", "sender"), ("bob", "receiver"),
                                                                ("mallory", "receiver"))}
    ctl.cli("member", "revoke", "mallory")
    port = await trio.to_thread.run_sync(ctl.start)
    get = lambda: scrape(ctl.metrics_port)  # noqa: E731
    try:
        m0 = await trio.to_thread.run_sync(get)
        assert value(m0, "groupsec_controller_registrations_total") == 0
        assert value(m0, "groupsec_controller_members", group="video", level="") == 2  # mallory is revoked
        assert value(m0, "groupsec_controller_members_connected", group="video", level="") == 0
        assert value(m0, "groupsec_controller_sessions") == 0

        sessions = [session_for(bundles[n], port, tmp_path / n, "sender" if n == "alice" else "receiver")
                    for n in ("alice", "bob", "mallory")]
        async with trio.open_nursery() as n:
            for s, _ in sessions:
                n.start_soon(s.run)
            await wait_until(lambda: all(dp.applied for _, dp in sessions[:2]), 15, "two registrations")
            await wait_until(lambda: sessions[2][0].last_error, 10, "mallory's refusal")
            m1 = await trio.to_thread.run_sync(get)
            assert value(m1, "groupsec_controller_registrations_total") == 2
            assert value(m1, "groupsec_controller_registrations_refused_total", code="revoked") >= 1
            assert value(m1, "groupsec_controller_registrations_refused_total", code="unknown-group") == 0
            assert value(m1, "groupsec_controller_sessions") == 2
            assert value(m1, "groupsec_controller_members_connected", group="video", level="") == 2
            rekeys0 = value(m1, "groupsec_controller_rekeys_sent_total", kind="rekey")
            acks0 = value(m1, "groupsec_controller_acks_total")

            await trio.to_thread.run_sync(lambda: ctl.cli("rekey", "video"))
            # both members acknowledge the rekey: nobody lags, the ack counter moved by 2
            m2 = await wait_until(lambda: (m := get()) and value(m, "groupsec_controller_acks_total") >= acks0 + 2
                                  and m, 15, "two acks")
            n.cancel_scope.cancel()
        assert value(m2, "groupsec_controller_rollovers_total", reason="operator") == 1
        # mallory's revocation was finished (evicted) at start-up; nothing evicted since
        assert value(m0, "groupsec_controller_rollovers_total", reason="eviction") == 1
        # ... its rekey was sent, then resent unchanged by the start-up resend of each level's last rekey
        assert value(m0, "groupsec_controller_rekeys_resent_total") == 1
        assert value(m0, "groupsec_controller_rekeys_sent_total", kind="rekey") == 2
        assert value(m0, "groupsec_controller_rekeys_sent_total", kind="lkh") == 0
        assert value(m2, "groupsec_controller_rollovers_total", reason="eviction") == 1
        assert value(m2, "groupsec_controller_rekeys_sent_total", kind="rekey") == rekeys0 + 1
        assert value(m2, "groupsec_controller_msg_id", group="video", level="") == value(
            m1, "groupsec_controller_msg_id", group="video", level="") + 1
        await wait_until(lambda: value(get(), "groupsec_controller_members_lagging", group="video", level="") == 0,
                         10, "no lagging member")
        await wait_until(lambda: value(get(), "groupsec_controller_sessions") == 0, 10, "sessions to close")
        code, text = await trio.to_thread.run_sync(fetch, ctl.metrics_port, "/metrics")
        assert code == 200
        types = {fam.name: fam.type for fam in text_string_to_metric_families(text)}
        assert types["groupsec_controller_registrations"] == "counter"
        assert types["groupsec_controller_members"] == "gauge"
        assert all(name.startswith("groupsec_") for name in types)
        assert (await trio.to_thread.run_sync(fetch, ctl.metrics_port, "/nothing"))[0] == 404
    finally:
        ctl.stop()

    lines = ctl.log_file.read_text().splitlines()
    assert lines
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    for d in docs:
        assert {"time", "level", "logger", "message"} <= set(d)
    assert any(d["level"] == "DEBUG" for d in docs) or any(d["level"] == "INFO" for d in docs)
    assert any("TEK rollover (operator)" in d["message"] for d in docs)
    assert any("refused" in d["message"] and "mallory" in d["message"] for d in docs)
