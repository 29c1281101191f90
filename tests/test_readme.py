"""Every command README.md shows is run here, as written (ports are swapped for free ones).

- The quick start's `make demo` must run `groupsec demo` (tests/test_demo.py runs the demo
  itself) and `make test` must run pytest (CI runs it: .ci/run calls `make test`).
- The walkthrough block runs in order in a temporary directory: a real controller and two
  agents in the background, then the operator commands, checking what the README claims
  (a datagram sent to the sender's relay reaches the receiver's relay port; revoke evicts).
- The "Other commands" block runs too (the demo with a short duration, inspect on the demo's
  own capture, a short packet bench, enroll + sign).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def console_blocks() -> list[list[str]]:
    """Every ```console block of the README, as its list of `$ ` commands."""
    blocks = re.findall(r"```console\n(.*?)```", README, re.S)
    return [[ln[2:].strip() for ln in b.splitlines() if ln.startswith("$ ")] for b in blocks]


def block_after(heading: str) -> list[str]:
    tail = README.split(heading, 1)[1]
    return [ln[2:].strip() for ln in re.search(r"```console\n(.*?)```", tail, re.S).group(1).splitlines()
            if ln.startswith("$ ")]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def run(cmd: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(shlex.split(cmd), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"`{cmd}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def wait_for(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_readme_command_is_covered_by_this_file() -> None:
    shown = {c for b in console_blocks() for c in b}
    covered = set(block_after("## Quick start")) | set(block_after("## Walkthrough")) | set(
        block_after("Other commands:"))
    assert shown == covered, f"README commands no test runs: {sorted(shown - covered)}"
    assert block_after("## Quick start") == ["make demo", "make test"]


def test_quick_start_targets_run_the_demo_and_the_suite() -> None:
    demo = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    test = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bgroupsec demo\b", demo), demo
    assert re.search(r"-m pytest\b", test), test
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_walkthrough(tmp_path: Path) -> None:
    cmds = block_after("## Walkthrough")
    ctl, relay_in, relay_out = free_port(), free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    subst = {"7443": str(ctl), "6000": str(relay_in), "6001": str(relay_out)}
    background: list[subprocess.Popen[str]] = []
    try:
        for cmd in cmds:
            for a, b in subst.items():
                cmd = cmd.replace(a, b)
            if not cmd.endswith("&"):
                out = run(cmd, tmp_path).stdout
                if cmd.startswith("groupsec status"):
                    assert "camera" in out
                    assert "screen" in out
                if cmd.startswith("groupsec-agent status"):
                    assert "registered" in out
                if cmd.startswith("groupsec member revoke"):
                    assert "revoked" in out
                if cmd.startswith("groupsec member list"):
                    assert re.search(r"screen\s+revoked", out), out
                continue
            args = shlex.split(cmd[:-1])
            with open(tmp_path / f"bg{len(background)}.log", "w") as log:
                background.append(subprocess.Popen(args, cwd=tmp_path, env=env(), stdout=log, stderr=log, text=True))
            if args[:2] == ["groupsec", "serve"]:
                wait_for(lambda: _connects(ctl), "the controller to listen")
            else:
                state = tmp_path / args[args.index("--state-dir") + 1] / "status.json"
                wait_for(lambda state=state: _registered(state), f"{state} to show registration")
            if "camera.state" in cmd:  # both agents are up: the README's relay claim
                _relay_round_trip(relay_in, relay_out)
    finally:
        for p in background:
            p.terminate()
        for p in background:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _registered(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["agent"]["state"] == "registered"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _relay_round_trip(relay_in: int, relay_out: int) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", relay_out))
        rx.settimeout(0.5)
        for i in range(20):  # the sender may still be installing its outbound SA
            tx.sendto(b"hello group %d" % i, ("127.0.0.1", relay_in))
            try:
                data, _ = rx.recvfrom(2048)
            except TimeoutError:
                continue
            assert data.startswith(b"hello group")
            return
        raise AssertionError("nothing sent to the sender's relay reached the receiver's relay port")
    finally:
        rx.close()
        tx.close()


@pytest.mark.slow
def test_other_commands(tmp_path: Path) -> None:
    cmds = block_after("Other commands:")
    demo, inspect, bench, enroll, sign = cmds
    # The demo as shown, shortened, also exporting what `inspect` reads next.
    out = run(demo.replace("--duration 10", "--duration 6") + " --pcap capture.pcap --keys capture.keys",
              tmp_path, timeout=180).stdout
    assert json.loads(out.strip().splitlines()[-1])["ok"] is True
    out = run(inspect, tmp_path).stdout
    assert " ok" in out
    assert "auth-failed" not in out
    out = run(bench + " --iterations 200 --repeats 1", tmp_path).stdout
    assert "aes-gcm-16-128" in out
    assert "ratio" in out
    run("groupsec init gcks", tmp_path)
    run(enroll, tmp_path)
    key = tmp_path / "sensor-17" / "member.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    run(sign, tmp_path)
    assert b"BEGIN CERTIFICATE" in (tmp_path / "sensor-17" / "member.crt").read_bytes()
