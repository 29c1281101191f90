"""The full agent on the kernel data path (inside the VM): a controller, one sender and two
receivers in network namespaces on a bridge, each a real process (`groupsec serve`,
`groupsec-agent run --datapath xfrm`).

The applications are unmodified: the sender application is a plain UDP socket in the
sender's namespace that sends a numbered stream to the group (it relies on a route for the
group via eth0, no socket option); each receiver application is a plain UDP socket bound to
the group port and joined to the group. The kernel's XFRM does ESP (AES-GCM, tunnel mode,
one SA per sender) in between. The test checks, at the bridge and at the applications:

* every receiver application gets every number of the stream, across three rollovers
  (`groupsec rekey`), in plaintext;
* the sender's port on the bridge carries the stream only as ESP, under 4 SPIs (the initial
  one and one per rollover), never as plain UDP to the group, and no frame anywhere on the
  bridge contains the payload in the clear;
* after SIGTERM every agent exits 0 and its namespace holds no SA and no policy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kernel_net import IN_VM, SKIP_REASON

from groupsec.netns import Lan, Netns, child_env

pytestmark = pytest.mark.kernel

GROUP_NAME = "video"
PORT = 5004
CTL_PORT = 7443
PHASES = 4  # the initial TEK and three rollovers
PER_PHASE = 200
RATE = 50.0  # packets/s: a steady stream, four seconds per phase
ATD, DTD = 2.0, 1.5  # generous: under TCG an agent takes a while to verify and install a rekey
MARKER = b"GSXE-cleartext-marker"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
START_TIMEOUT = 120.0  # Python processes start slowly under TCG


def payload(seq: int) -> bytes:
    return MARKER + struct.pack("!I", seq) + bytes(150)


def cli(*args: str) -> str:
    """`groupsec ARGS` in this process: a new interpreter costs tens of seconds under TCG (imports over 9p)."""
    from groupsec.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    assert rc == 0, f"groupsec {' '.join(args)} exited {rc}: {err.getvalue()[-2000:]}"
    return out.getvalue()


def wait_for(pred: Any, what: str, procs: list[subprocess.Popen[bytes]], timeout: float = START_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"a process ({p.args!r}) exited with {p.returncode} while waiting for {what}"
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def diagnostics(members: list[Member]) -> str:
    out = []
    for m in members:
        log = m.log.read_text(errors="replace").splitlines()
        interesting = [ln for ln in log if any(w in ln for w in ("xfrm:", "rekey", "refused", "rror", "Trace"))]
        out += [f"--- {m.name}: ip -s xfrm state", m.ns.ip("-s", "xfrm", "state", "list").stdout,
                f"--- {m.name}: xfrm_stat", m.ns.run("cat", "/proc/net/xfrm_stat").stdout,
                f"--- {m.name}: log", *interesting[-40:]]
    return "\n".join(out)


def xfrm_dump(ns: Netns) -> tuple[str, str]:
    return ns.ip("xfrm", "state", "list").stdout.strip(), ns.ip("xfrm", "policy", "list").stdout.strip()


class Member:
    def __init__(self, tmp: Path, ns: Netns, name: str, role: str, controller: str) -> None:
        self.ns, self.name, self.role = ns, name, role
        self.state = tmp / name
        self.bundle = tmp / f"{name}.bundle"
        self.controller = controller
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        status = self.state / "status.json"
        if status.exists():
            status.unlink()
        cmd = self.ns.command(sys.executable, "-m", "agent.cli", "run", "--bundle", str(self.bundle),
                              "--controller", self.controller, "--group", f"{GROUP_NAME}:{self.role}",
                              "--datapath", "xfrm", "--interface", "eth0", "--state-dir", str(self.state),
                              "--log-level", "debug")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state / "status.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {}

    def ready(self) -> bool:
        """Registered, and the data path holds an SA in the direction of its role."""
        want = "out" if self.role == "sender" else "in"
        return any(sa.get("direction") == want for sa in self.status().get("datapath", {}).get("sas", []))


def test_xfrm_agents_protect_plain_multicast_apps(tmp_path: Path) -> None:
    if not IN_VM:
        pytest.skip(SKIP_REASON)
    lan = Lan(tag="gsxe")
    members: list[Member] = []
    procs: list[subprocess.Popen[bytes]] = []
    socks: list[socket.socket] = []
    try:
        _run(tmp_path, lan, members, procs, socks)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for s in socks:
            s.close()
        lan.close()


def _run(tmp: Path, lan: Lan, members: list[Member], procs: list[subprocess.Popen[bytes]],
         socks: list[socket.socket]) -> None:
    ctl, snd, r1, r2 = (lan.add(n) for n in ("ctl", "snd", "r1", "r2"))
    assert ctl.address is not None
    group = f"239.77.{os.urandom(1)[0]}.{1 + os.urandom(1)[0] % 250}"
    for ns in (snd, r1, r2):  # the plain applications find the group through the routing table
        ns.ip("route", "add", "239.0.0.0/8", "dev", "eth0")
    # -- the controller: one group on the kernel data path, per-sender SAs, raw ESP ----------
    home = tmp / "ctl"
    cli("init", str(home), "--host", ctl.address)
    (home / "groupsec.toml").write_text(f"""\
[controller]
listen = "{ctl.address}:{CTL_PORT}"
heartbeat_interval = 1.0
advertise = false
rekey_interface = "eth0"

[groups.{GROUP_NAME}]
dst = "{group}"
protocol = "udp"
port = {PORT}
protection = "esp"
suite = "aes-gcm-16-128"
mode = "tunnel"
tek_lifetime = 3600
atd = {ATD}
dtd = {DTD}
replay_window = 128
sender_policy = "per-sender"
sender_id_bits = 0
datapath = "xfrm"
rekey_channel = "239.77.255.1:7999"
udp_encap_port = 0
""")
    controller = f"{ctl.address}:{CTL_PORT}"
    for ns, name, role in ((snd, "sender", "sender"), (r1, "recv1", "receiver"), (r2, "recv2", "receiver")):
        m = Member(tmp, ns, name, role, controller)
        cli("member", "add", name, "--group", f"{GROUP_NAME}:{role}", "--xfrm", "--out", str(m.bundle),
            "--dir", str(home))
        members.append(m)
    port_file = tmp / "ctl.port"
    with (tmp / "ctl.log").open("wb") as log:
        procs.append(subprocess.Popen(ctl.command(sys.executable, "-m", "groupsec.cli", "serve", "--dir", str(home),
                                                  "--no-advertise", "--port-file", str(port_file)),
                                      env=child_env(), stdout=log, stderr=subprocess.STDOUT))
    wait_for(lambda: port_file.exists() and port_file.read_text().strip(), "the controller to listen", procs)
    for m in members:
        m.start()
        assert m.proc is not None
        procs.append(m.proc)
    wait_for(lambda: all(m.ready() for m in members), "the agents to install their SAs", procs)

    # -- the applications and the capture -----------------------------------------------------
    apps: list[socket.socket] = []
    for m in members[1:]:
        with m.ns.entered():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((group, PORT))
        assert m.ns.address is not None
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton(m.ns.address))
        s.setblocking(False)
        apps.append(s)
        socks.append(s)
    with snd.entered():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # no IP_MULTICAST_IF: the route decides
    socks.append(tx)
    with lan.hub.entered():
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    cap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    cap.setblocking(False)
    socks.append(cap)
    sender_port = f"h{lan.members.index(snd) + 1}"  # the sender's veth end on the bridge

    got: list[set[int]] = [set() for _ in apps]
    wire: dict[str, Any] = {"esp": 0, "spis": {}, "plain_udp": 0, "cleartext": 0, "frames": 0, "esp_src": {}}

    def drain() -> None:
        for s, seen in zip(apps, got, strict=True):
            while True:
                try:
                    data = s.recv(2048)
                except BlockingIOError:
                    break
                if data.startswith(MARKER) and len(data) == len(payload(0)):
                    seen.add(struct.unpack_from("!I", data, len(MARKER))[0])
        while True:
            try:
                frame, addr = cap.recvfrom(65535)
            except BlockingIOError:
                break
            wire["frames"] += 1
            if MARKER in frame:
                wire["cleartext"] += 1
            if frame[12:14] != b"\x08\x00" or len(frame) < 34 or socket.inet_ntoa(frame[30:34]) != group:
                continue
            if addr[0] != sender_port or addr[2] == PACKET_OUTGOING:
                continue  # count each packet once: as it enters the bridge from the sender
            ihl = (frame[14] & 0xF) * 4
            if frame[23] == 50:
                wire["esp"] += 1
                spi = frame[14 + ihl:18 + ihl].hex()
                wire["spis"][spi] = wire["spis"].get(spi, 0) + 1
                src = socket.inet_ntoa(frame[26:30])  # the outer source: a receiver drops 0.0.0.0 as a martian
                wire["esp_src"][src] = wire["esp_src"].get(src, 0) + 1
            elif frame[23] == 17:
                wire["plain_udp"] += 1

    # -- the stream: four phases, a rollover before each of the last three -------------------
    seq = 0
    start = time.monotonic()
    for phase in range(PHASES):
        if phase:
            cli("rekey", GROUP_NAME, "--dir", str(home))
        for _ in range(PER_PHASE):
            tx.sendto(payload(seq), (group, PORT))
            seq += 1
            drain()
            delay = start + seq / RATE - time.monotonic()
            if delay > 0:
                select.select([], [], [], delay)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(len(g) == seq for g in got):
        time.sleep(0.05)
        drain()
    drain()
    assert set(wire["esp_src"]) == {snd.address}, f"ESP outer sources by count: {wire['esp_src']}"
    for m, seen in zip(members[1:], got, strict=True):
        missing = sorted(set(range(seq)) - seen)
        assert not missing, (f"{m.name} lost {len(missing)} of {seq} packets (first {missing[:10]}); "
                             f"ESP per SPI from the sender: {wire['spis']}\n{diagnostics(members)}")
    assert wire["esp"] >= seq, f"only {wire['esp']} ESP packets of {seq} left the sender"
    assert len(wire["spis"]) >= PHASES, f"the stream used {len(wire['spis'])} SPIs, expected {PHASES} (3 rollovers)"
    assert wire["plain_udp"] == 0, f"{wire['plain_udp']} plain UDP packets to the group crossed the bridge"
    assert wire["cleartext"] == 0, f"{wire['cleartext']} frames on the bridge carried the payload in the clear"

    # -- SIGTERM: every agent leaves nothing behind --------------------------------------------
    for m in members:
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)
    for m in members:
        assert m.proc is not None
        assert m.proc.wait(60) == 0, f"{m.name} exited with {m.proc.returncode}: {m.log.read_text()[-2000:]}"
        states, policies = xfrm_dump(m.ns)
        assert states == "", f"{m.name} left SAs behind:\n{states}"
        assert policies == "", f"{m.name} left policies behind:\n{policies}"
