"""Network namespaces for end-to-end tests (root only): groupsec.netns's LAN of member
namespaces on one Linux bridge, plus a capture on the bridge and tiny test applications.

    with Lan() as lan:                          # a hub namespace holding bridge br0
        a = lan.add("a")                        # namespace with eth0 = 10.x.y.1/24 on the bridge
        b = lan.add("b")
        cap = lan.capture()                     # tcpdump on br0 (every frame of the LAN)
        p = a.popen(sys.executable, "-m", "...")
        ...
        assert b"secret" not in cap.stop()      # the raw pcap bytes

The bridge has multicast snooping off, so every port (an eavesdropper's too) sees all
multicast. Names are random so that concurrent tests do not collide; everything is
deleted on exit (deleting a namespace deletes its veth end, and the hub its bridge).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from groupsec.netns import Lan as _Lan
from groupsec.netns import Netns, sh

__all__ = ["Capture", "Lan", "Netns", "sh", "skip_unless_netns"]


def skip_unless_netns() -> None:
    """Skip (with a one-line reason) where namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip)")


class Capture:
    def __init__(self, hub: Netns, dev: str) -> None:
        fd, name = tempfile.mkstemp(prefix="gs-cap-", suffix=".pcap")
        os.close(fd)
        self.path = Path(name)
        self.proc = subprocess.Popen(["ip", "netns", "exec", hub.name, "tcpdump", "-Z", "root", "-i", dev, "-U", "-n", "-s", "0",
                                      "-w", str(self.path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        # tcpdump says "listening on ..." once it captures
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if "listening" not in line:
            raise RuntimeError(f"tcpdump did not start: {line.strip()}")

    def stop(self) -> bytes:
        if self.proc.poll() is None:
            time.sleep(0.2)
            self.proc.terminate()
            self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        data = self.path.read_bytes()
        self.path.unlink(missing_ok=True)
        return data


class Lan(_Lan):
    """groupsec.netns.Lan plus captures on the bridge (tcpdump in the hub namespace)."""

    def __init__(self, prefix: str | None = None) -> None:
        super().__init__(prefix)
        self.captures: list[Capture] = []

    def capture(self) -> Capture:
        c = Capture(self.hub, "br0")
        self.captures.append(c)
        return c

    def close(self) -> None:
        for c in self.captures:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
            c.path.unlink(missing_ok=True)
        super().close()

    def __enter__(self) -> Lan:
        return self


# --- tiny applications (run inside a namespace with ns.python("-c", APP, ...)) --------------------

LISTEN_APP = r"""
import json, socket, struct, sys, time
bind_host, port, group, expect, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((bind_host, port))
if group != "-":   # "G" joins where the route for G points (the TUN device, in TUN mode); "G@ADDR" on ADDR
    g, _, iface = group.partition("@")
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(g) + socket.inet_aton(iface or "0.0.0.0"))
print("ready", flush=True)
got, end = [], time.monotonic() + seconds
while len(got) < expect and time.monotonic() < end:
    s.settimeout(max(0.01, end - time.monotonic()))
    try:
        data, addr = s.recvfrom(65536)
    except TimeoutError:
        break
    got.append([data.decode("latin-1"), addr[0]])
print(json.dumps(got), flush=True)
"""

SEND_APP = r"""
import json, socket, sys, time
host, port, msgs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for m in msgs:
    s.sendto(m.encode(), (host, port))
    time.sleep(0.01)
"""


def start_listener(ns: Netns, bind: str, port: int, group: str | None = None, expect: int = 1 << 30,
                   seconds: float = 10.0) -> subprocess.Popen[str]:
    p = ns.python("-c", LISTEN_APP, bind, str(port), group or "-", str(expect), str(seconds))
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"[{ns.name}] listener did not start: {line!r} {p.stderr.read() if p.stderr else ''}")
    return p


def listener_result(p: subprocess.Popen[str], timeout: float = 20) -> list[tuple[str, str]]:
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"listener failed: {err.strip()[-2000:]}")
    return [(m, a) for m, a in json.loads(out.strip().splitlines()[-1])]


def send(ns: Netns, host: str, port: int, messages: list[str]) -> None:
    ns.run(sys.executable, "-c", SEND_APP, host, str(port), json.dumps(messages))


def start_agent(ns: Netns, spec: dict[str, Any], module: str = "agent.datapath.bench") -> subprocess.Popen[str]:
    """A static-SA agent (``python -m agent.datapath.bench agent``): the spec (with keys) goes on stdin."""
    p = ns.python("-m", module, "agent")
    assert p.stdin is not None
    assert p.stdout is not None
    p.stdin.write(json.dumps(spec) + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"[{ns.name}] agent exited: {p.stderr.read() if p.stderr else ''}")
    ready = json.loads(line)
    assert ready.get("ready"), ready
    return p


def agent_stats(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdin is not None
    assert p.stdout is not None
    p.stdin.write("stats\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())  # type: ignore[no-any-return]


def stop_agent(p: subprocess.Popen[str]) -> dict[str, Any]:
    """Ask the agent to quit; returns its final statistics."""
    assert p.stdin is not None
    assert p.stdout is not None
    p.stdin.write("quit\n")
    p.stdin.flush()
    out = p.stdout.readline()
    p.wait(10)
    return json.loads(out)  # type: ignore[no-any-return]
