"""The controller as a real process (`groupsec serve`): kill -9 and restart keeps every key,
message ID and SPI; CLI revoke and rekey act on the running server at once; and 1,000
members register at once from four client processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from ctl_helpers import add_member

from groupsec.bench.register import run_clients as run_load_clients
from groupsec.bench.register import setup_home, start_controller
from groupsec.controller import pki
from groupsec.controller.loadclient import client_context, register
from groupsec.controller.store import SQLiteStore
from groupsec.protocol.messages import Grant, RekeyPush, ResyncReply
from groupsec.protocol.rekey import Reassembler, open_rekey_untrusted

V = [{"group": "video", "role": "receiver", "level": ""}]


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "groupsec.cli", *args, "-d", str(home)], capture_output=True,
                          text=True, timeout=60)


def _spis(home: Path) -> list[str]:
    s = SQLiteStore(home / "state.db")
    try:
        return [k for k, _ in s.scan("spi/")]
    finally:
        s.close()


@pytest.mark.slow
async def test_kill_9_restart_keeps_state_and_never_reuses_spis(home: Path, tmp_path: Path):
    add_member(home, "alice", [("video", "sender", "")])
    add_member(home, "bob", [("video", "receiver", "")])
    ctx_a = client_context(home / "ca.crt", home / "alice.pem")
    ctx_b = client_context(home / "ca.crt", home / "bob.pem")
    proc, port = await trio.to_thread.run_sync(start_controller, home, tmp_path / "c1.log")
    try:
        await register("127.0.0.1", port, ctx_a, [{"group": "video", "role": "sender"}])
        _, bob = await register("127.0.0.1", port, ctx_b, V, keep=True)
        try:
            r = await trio.to_thread.run_sync(_cli, home, "rekey", "video")
            assert r.returncode == 0, r.stderr
            assert "message ID 1" in r.stdout
            push = await bob.recv()
            assert isinstance(push, RekeyPush)
        finally:
            await bob.aclose()
        ra, _ = await register("127.0.0.1", port, ctx_a, [{"group": "video", "role": "sender"}])
        rb, _ = await register("127.0.0.1", port, ctx_b, V)
        before = [Grant.from_wire_untrusted(g) for g in (ra.grants + rb.grants)]
        spis_before = _spis(home)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    proc, port = await trio.to_thread.run_sync(start_controller, home, tmp_path / "c2.log")
    conns = []
    try:
        ra2, _ = await register("127.0.0.1", port, ctx_a, [{"group": "video", "role": "sender"}])
        rb2, bob = await register("127.0.0.1", port, ctx_b, V, keep=True)
        conns.append(bob)
        [ga, gb] = [Grant.from_wire_untrusted(g) for g in (ra2.grants + rb2.grants)]
        # the same KEK, epoch, message ID, sender ID and SAs (keys included) as before the kill
        assert (ga.kek, ga.kek_epoch, ga.msg_id, ga.sender_id) == (before[0].kek, 1, 1, 1)
        assert len(ga.sas) == 2  # the current and the next generation: several SPIs
        assert ga.sas == before[0].sas
        assert gb.sas == before[1].sas
        assert rb2.rekey_public_key == rb.rekey_public_key
        # a new rollover gets a fresh SPI: none reused
        r = await trio.to_thread.run_sync(_cli, home, "rekey", "video")
        assert "message ID 2" in r.stdout, r.stderr
        spis_after = _spis(home)
        assert set(spis_before) < set(spis_after)
        assert len(spis_after) == len(set(spis_after)) == len(spis_before) + 1
        # revoke through the CLI acts at once on the running server: bob gets the new KEK over TLS
        reasm, msg = Reassembler(), None
        vk = [pki.load_rekey_key(home).public_key()]
        keks = {1: gb.kek}
        r = await trio.to_thread.run_sync(_cli, home, "member", "revoke", "alice")
        assert r.returncode == 0, r.stderr
        assert "evicted" in r.stdout
        while msg is None or msg.msg_id < 3:
            m = await bob.recv()
            if isinstance(m, ResyncReply):
                g = Grant.from_wire_untrusted(m.grant)
                keks[g.kek_epoch] = g.kek
                continue
            msg = reasm.add(open_rekey_untrusted(m.datagram, vk, keks), 0.0)
        assert msg.kek_epoch == 2
        assert msg.revoked_senders == (1,)
        await bob.aclose()
        r2, _ = await register("127.0.0.1", port, ctx_a, [{"group": "video", "role": "sender"}])
        assert r2.code == "revoked"
        st = await trio.to_thread.run_sync(_cli, home, "status", "--json")
        assert '"revoked": true' in st.stdout
    finally:
        for c in conns:
            await c.aclose()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_thousand_members_register_at_once_from_four_processes(tmp_path: Path):
    home, files = setup_home(tmp_path, 1000, 4)
    proc, port = start_controller(home, tmp_path / "controller.log")
    try:
        res = run_load_clients(home, port, files, "bench:receiver", 64)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert res["errors"] == {}
    assert res["failures"] == 0
    assert res["ok"] == 1000
