"""The agent session shell against a real controller process (TLS 1.3 over loopback), with a
recording data path: restart survival without dropping SAs, CA pinning, revocation, backoff."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from agent_helpers import Controller, GroupDef

from agent.config import AgentConfig, GroupSpec, load_bundle
from agent.datapath.base import GroupInstall
from agent.discovery import accept
from agent.session import AgentSession


class LogDatapath:
    def __init__(self) -> None:
        self.applied: list[GroupInstall] = []
        self.removed: list[tuple[str, str]] = []

    def apply(self, install: GroupInstall) -> None:
        self.applied.append(install)

    def remove_group(self, key: tuple[str, str]) -> None:
        self.removed.append(key)

    def statistics(self) -> dict[str, Any]:
        return {}

    def spis(self) -> set[int]:
        return {sa.spi for sa in self.applied[-1].inbound} if self.applied else set()


def config(bundle: Path, port: int, tmp: Path, role: str = "receiver", **kw: Any) -> AgentConfig:
    kw = {"reconnect_min": 0.1, "reconnect_max": 0.4, "ack_jitter": 0.1, **kw}
    return AgentConfig(bundle=bundle, groups=(GroupSpec("video", role),), controller=("127.0.0.1", port),
                       state_dir=tmp / "st", **kw)


async def wait_until(pred: Any, limit: float, what: str) -> None:
    """Poll (the session exposes counters, not events, for these)."""
    with trio.fail_after(limit):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.02)


@pytest.mark.slow
async def test_controller_kill9_and_restart_keeps_sas_and_reregisters(tmp_path):
    ctl = Controller(tmp_path, [GroupDef("video")], heartbeat=1.0)
    bundle = ctl.add_member("bob", "video:receiver")
    port = await trio.to_thread.run_sync(ctl.start)
    dp = LogDatapath()
    session = AgentSession(config(bundle, port, tmp_path), load_bundle(bundle), dp)
    try:
        async with trio.open_nursery() as n:
            await n.start(session.run)
            held = dp.spis()
            assert held
            applies = len(dp.applied)
            await trio.to_thread.run_sync(ctl.kill9)
            await wait_until(lambda: not session.connected, 10, "the session to notice")
            await wait_until(lambda: session.counters["connect_failures"] >= 2, 10, "failed reconnects")
            # while the controller is away nothing was taken out of the data path
            assert dp.removed == []
            assert len(dp.applied) == applies
            await trio.to_thread.run_sync(ctl.start)
            await wait_until(lambda: session.member.counters["registrations"] == 2, 10, "re-registration")
            await wait_until(lambda: session.connected, 5, "connected")
            assert dp.removed == []
            assert held <= dp.spis()  # the SAs that are still valid stay installed
            # the restarted controller serves rekeys to the re-registered session
            await trio.to_thread.run_sync(lambda: ctl.cli("rekey", "video"))
            await wait_until(lambda: dp.spis() - held, 5, "the post-restart rekey")
            n.cancel_scope.cancel()
    finally:
        ctl.stop()


@pytest.mark.slow
async def test_controller_with_another_ca_is_refused(tmp_path):
    ours = Controller(tmp_path / "ours", [GroupDef("video")])
    bundle = ours.add_member("bob", "video:receiver")
    other = Controller(tmp_path / "other", [GroupDef("video")])
    other.add_member("bob", "video:receiver")
    port = await trio.to_thread.run_sync(other.start)
    dp = LogDatapath()
    session = AgentSession(config(bundle, port, tmp_path), load_bundle(bundle), dp)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(session.run)
            await wait_until(lambda: session.counters["connect_failures"] >= 2, 10, "refused handshakes")
            n.cancel_scope.cancel()
    finally:
        other.stop()
    assert session.member.counters["registrations"] == 0
    assert dp.applied == []
    assert "CERTIFICATE_VERIFY_FAILED" in session.last_error


@pytest.mark.slow
async def test_revoked_member_is_told_so_and_retries_slowly(tmp_path):
    ctl = Controller(tmp_path, [GroupDef("video")])
    bundle = ctl.add_member("mallory", "video:receiver")
    ctl.cli("member", "revoke", "mallory")
    port = await trio.to_thread.run_sync(ctl.start)
    dp = LogDatapath()
    session = AgentSession(config(bundle, port, tmp_path, reconnect_max=30.0), load_bundle(bundle), dp)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(session.run)
            await wait_until(lambda: session.last_error, 10, "the refusal")
            await trio.sleep(1.5)
            n.cancel_scope.cancel()
    finally:
        ctl.stop()
    assert session.last_error.startswith("revoked") or "revoked" in session.last_error
    assert session.counters["connects"] + session.counters["connect_failures"] == 1  # no fast retry loop
    assert dp.applied == []


def test_discovery_accepts_only_our_ca_and_protocol_version():
    fp = "ab" * 32
    assert accept({b"version": b"1", b"ca": fp.encode()}, fp) is None
    assert accept({b"version": b"1", b"ca": fp.upper().encode()}, fp) is None
    assert "CA fingerprint" in accept({b"version": b"1", b"ca": b"cd" * 32}, fp)
    assert "CA fingerprint" in accept({b"version": b"1"}, fp)
    assert "version" in accept({b"version": b"2", b"ca": fp.encode()}, fp)
    assert "version" in accept({}, fp)
