"""`groupsec-agent run --datapath xfrm` on the host kernel (no VM: policies need no ESP): at
start the agent removes the stale XFRM state of ours that a killed earlier run left behind
(and nothing of anybody else's), and SIGTERM ends it with exit 0. The full path (SAs, rekeys,
cleanup after exit) runs in the VM: tests/kernel/test_xfrm_agent_e2e.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.datapath.base import GroupInstall
from agent.datapath.xfrm import DEFAULT_PRIORITY, XfrmDatapath
from groupsec.ipsec.policy import GroupPolicy
from groupsec.netns import Netns, child_env

pytestmark = pytest.mark.netns


def _cli(*args: str) -> None:
    from groupsec.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(list(args)) == 0, err.getvalue()


def _policies(ns: Netns) -> str:
    return ns.ip("xfrm", "policy", "list").stdout


def test_agent_removes_stale_state_of_ours_at_start_and_exits_cleanly(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    home = tmp_path / "ctl"
    _cli("init", str(home), "--host", "127.0.0.1")
    (home / "groupsec.toml").write_text('[controller]\nlisten = "127.0.0.1:0"\nadvertise = false\n\n'
                                        '[groups.video]\ndst = "239.66.1.1"\nport = 5004\nudp_encap_port = 0\n'
                                        'rekey_channel = "239.66.1.2:7999"\n')
    bundle = tmp_path / "r.bundle"
    _cli("member", "add", "r", "--group", "video:receiver", "--xfrm", "--out", str(bundle), "--dir", str(home))
    ns = Netns(f"gsxw-{uuid.uuid4().hex[:8]}")
    proc = None
    try:
        ns.ip("xfrm", "policy", "add", "dst", "10.1.1.1/32", "dir", "out", "priority", "100", "action", "block")
        with ns.entered():
            crashed = XfrmDatapath()
        crashed.apply(GroupInstall(GroupPolicy("stale", "239.66.9.9", udp_encap_port=None)))
        crashed.nl.close()  # killed: nothing cleaned up
        assert f"priority {DEFAULT_PRIORITY}" in _policies(ns)
        log = tmp_path / "agent.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(ns.command(sys.executable, "-m", "agent.cli", "run", "--bundle", str(bundle),
                                               "--controller", "127.0.0.1:9", "--group", "video:receiver",
                                               "--datapath", "xfrm", "--state-dir", str(tmp_path / "state")),
                                    env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "239.66.9.9" in _policies(ns):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the agent did not remove the stale policies at start"
            time.sleep(0.1)
        assert "10.1.1.1/32" in _policies(ns), "the agent removed a policy that is not ours"
        assert "stale" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
        assert _policies(ns).count("priority") == 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        ns.close()
