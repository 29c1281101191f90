"""Real processes for the agent end-to-end tests: a controller home, `groupsec serve`, and
`groupsec-agent run` processes, each a subprocess, talking over real sockets.

Addresses and ports are random per test so that tests of other helpers running at the same
time on this machine do not collide.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


def random_group() -> str:
    b = os.urandom(3)
    return f"239.{100 + b[0] % 50}.{b[1]}.{1 + b[2] % 250}"


def run_cli(*args: str, check: bool = True, module: str = "groupsec.cli", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", module, *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class GroupDef:
    name: str
    dst: str = field(default_factory=random_group)
    port: int = field(default_factory=free_port)
    encap: int | None = field(default_factory=free_port)  # None: raw ESP
    rekey_addr: str = field(default_factory=random_group)
    rekey_port: int = field(default_factory=free_port)
    extra: dict[str, Any] = field(default_factory=dict)

    def toml(self) -> str:
        lines = [f"[groups.{self.name}]", f'dst = "{self.dst}"', 'protocol = "udp"', f"port = {self.port}",
                 'protection = "esp"', 'suite = "aes-gcm-16-128"', 'mode = "tunnel"', 'sender_policy = "shared"',
                 "sender_id_bits = 8", f'rekey_channel = "{self.rekey_addr}:{self.rekey_port}"',
                 f"udp_encap_port = {self.encap if self.encap is not None else 0}"]
        for k, v in self.extra.items():
            lines.append(f"{k} = {json.dumps(v)}")
        return "\n".join(lines) + "\n"


class Controller:
    """A controller home in ``tmp/ctl`` and, once started, its `groupsec serve` process."""

    def __init__(self, tmp: Path, groups: list[GroupDef], *, heartbeat: float = 10.0, rekey_interface: str = "lo",
                 listen: str = "127.0.0.1:0", hosts: tuple[str, ...] = (), netns: str | None = None,
                 advertise: bool = False) -> None:
        self.tmp = tmp
        self.home = tmp / "ctl"
        self.groups = {g.name: g for g in groups}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.listen = listen
        self.netns = netns
        host_args = [a for h in hosts for a in ("--host", h)]
        run_cli("init", str(self.home), *host_args)
        cfg = ("[controller]\n"
               f'listen = "{listen}"\n'
               f"heartbeat_interval = {heartbeat}\n"
               f'rekey_interface = "{rekey_interface}"\n'
               "rekey_ttl = 4\n"
               f"advertise = {'true' if advertise else 'false'}\n\n" + "\n".join(g.toml() for g in groups))
        self.advertise = advertise
        (self.home / "groupsec.toml").write_text(cfg)

    def add_member(self, name: str, *specs: str) -> Path:
        out = self.tmp / f"{name}.bundle"
        run_cli("member", "add", name, *[a for s in specs for a in ("--group", s)], "-d", str(self.home),
                "--out", str(out))
        return out

    def start(self, timeout: float = 20.0) -> int:
        port_file = self.tmp / "ctl.port"
        if port_file.exists():
            port_file.unlink()
        listen = self.listen if self.port is None else self.listen.rsplit(":", 1)[0] + f":{self.port}"
        cmd = [sys.executable, "-m", "groupsec.cli", "serve", "-d", str(self.home), "--listen", listen,
               *([] if self.advertise else ["--no-advertise"]), "--port-file", str(port_file), "-v"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.tmp / "ctl.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), timeout, "the controller's port file")
        self.port = int(port_file.read_text().strip())
        return self.port

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*args, "-d", str(self.home)]
        if self.netns:
            p = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-m", "groupsec.cli", *cmd],
                               env=ENV, capture_output=True, text=True, timeout=60)
            if check and p.returncode != 0:
                raise AssertionError(f"groupsec {' '.join(cmd)}: {p.stderr[-2000:]}")
            return p
        return run_cli(*cmd, check=check)

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)  # type: ignore[no-any-return]

    def log_text(self) -> str:
        return (self.tmp / "ctl.log").read_text(errors="replace")


class Agent:
    """One `groupsec-agent run` process with its own agent.toml and state dir."""

    def __init__(self, tmp: Path, name: str, bundle: Path, controller: str, groups: list[dict[str, Any]], *,
                 interface: str | None = None, netns: str | None = None, session: dict[str, Any] | None = None,
                 testing: dict[str, Any] | None = None, tun: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.name = name
        self.dir = tmp / f"agent-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self.dir / "state"
        self.netns = netns
        lines = [f'bundle = "{bundle}"', f'controller = "{controller}"', f'state_dir = "{self.state}"',
                 'log_level = "debug"']
        if interface:
            lines.append(f'interface = "{interface}"')
        for k, v in (extra or {}).items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("\n[session]\nack_jitter = 0.2\nreconnect_min = 0.2\nreconnect_max = 2.0\nstatus_interval = 0.2")
        for k, v in (session or {}).items():
            lines.append(f"{k} = {json.dumps(v)}")
        if testing:
            lines.append("\n[testing]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in testing.items()]
        if tun:
            lines.append("\n[tun]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in tun.items()]
        for g in groups:
            lines.append("\n[[group]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in g.items()]
        self.config = self.dir / "agent.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.dir / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        return self

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state / "status.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def group(self, name: str, level: str = "") -> dict[str, Any] | None:
        st = self.status()
        if st is None:
            return None
        for g in st["agent"]["groups"]:
            if g["group"] == name and g["level"] == level:
                return g  # type: ignore[no-any-return]
        return None

    def wait_registered(self, group: str, timeout: float = 20.0) -> dict[str, Any]:
        def ready() -> Any:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent {self.name} exited {self.proc.returncode}: {self.log_text()[-3000:]}")
            g = self.group(group)
            return g if g and g["sas"] else None
        return wait_for(ready, timeout, f"agent {self.name} to install {group}")  # type: ignore[no-any-return]

    def datapath_group(self, group: str) -> dict[str, Any]:
        st = self.status()
        assert st is not None
        return st["datapath"]["groups"][group]  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log_text(self) -> str:
        return (self.dir / "agent.log").read_text(errors="replace")


def udp_socket(bind: tuple[str, int] = ("127.0.0.1", 0), rcvbuf: int = 4 << 20) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind(bind)
    return s


def sniffer(group: str, port: int) -> socket.socket:
    """A socket that sees every datagram to (group, port) on loopback (next to the agents' own)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((group, port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
    return s


def send_paced(port: int, payloads: list[bytes], gap: float = 0.002) -> None:
    """Send payloads to a local relay port, ``gap`` seconds apart."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in payloads:
            s.sendto(p, ("127.0.0.1", port))
            time.sleep(gap)


def drain(sock: socket.socket, quiet: float = 0.5, limit: float = 10.0) -> list[bytes]:
    """Receive until nothing arrives for ``quiet`` seconds."""
    out = []
    sock.settimeout(quiet)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(65535))
        except TimeoutError:
            break
    return out


class Stream:
    """Sequence-numbered UDP at a fixed rate into a relay port (a thread), and collectors that
    record which sequence numbers each receiver's application got."""

    def __init__(self, target: tuple[str, int], pps: int = 1000, size: int = 200, tag: bytes = b"STREAM") -> None:
        import threading

        self.target, self.pps, self.size, self.tag = target, pps, size, tag
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.collectors: dict[str, tuple[socket.socket, set[int], Any]] = {}

    def collect(self, name: str, sock: socket.socket) -> None:
        import threading

        got: set[int] = set()
        sock.settimeout(0.2)

        def loop() -> None:
            while True:
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    if self._stop.is_set() and self._drained:
                        return
                    continue
                except OSError:
                    return
                if data.startswith(self.tag):
                    got.add(int(data[len(self.tag):len(self.tag) + 10]))

        t = threading.Thread(target=loop, daemon=True)
        self.collectors[name] = (sock, got, t)
        t.start()

    _drained = False

    def start(self) -> Stream:
        self._thread.start()
        return self

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            t0 = time.monotonic()
            pad = b"x" * max(0, self.size - len(self.tag) - 10)
            while not self._stop.is_set():
                due = int((time.monotonic() - t0) * self.pps)
                while self.sent < due:
                    s.sendto(self.tag + b"%010d" % self.sent + pad, self.target)
                    self.sent += 1
                time.sleep(0.002)

    def stop(self, settle: float = 1.0) -> None:
        self._stop.set()
        self._thread.join(5)
        time.sleep(settle)
        self._drained = True
        for _, _, t in self.collectors.values():
            t.join(5)

    def got(self, name: str) -> set[int]:
        return self.collectors[name][1]

    def lost(self, name: str) -> list[int]:
        got = self.got(name)
        return [i for i in range(self.sent) if i not in got]


def stream_through_eviction(ctl: Controller, agents: dict[str, Agent], apps: dict[str, socket.socket],
                            listen: int, sender: str, victim: str) -> tuple[Stream, int]:
    """Stream at 1,000 pps into ``sender``'s relay, revoke ``victim`` after 1 s, and keep going
    2 s after the sender switched SA. Returns the stopped stream and the boundary: the count of
    packets handed to the relay before the sender sealed under the post-eviction SA (every
    packet from there on is sealed with keys the victim must not have)."""
    old_out = next(sa["spi"] for sa in agents[sender].group("video")["sas"] if sa["direction"] == "out")
    stream = Stream(("127.0.0.1", listen), pps=1000)
    for n, s in apps.items():
        stream.collect(n, s)
    stream.start()
    time.sleep(1.0)
    ctl.cli("member", "revoke", victim)

    def switched() -> int | None:
        grp = agents[sender].group("video")
        outs = [sa["spi"] for sa in grp["sas"] if sa["direction"] == "out"] if grp else []
        return stream.sent if outs and outs[0] != old_out else None

    boundary = wait_for(switched, 10, f"{sender} to send under the new SA", interval=0.01)
    time.sleep(2.0)
    stream.stop(settle=1.5)
    return stream, boundary


def relay_pair(tmp_path: Path, ctl: Controller, port: int, bundles: dict[str, Any],
               sender: str = "alice", receiver: str = "bob") -> tuple[dict[str, Agent], int, int]:
    """A sender agent with a relay listening on a free port and a receiver agent delivering to
    another free port, both for group "video". Returns (agents, listen port, deliver port)."""
    listen, deliver = free_port(), free_port()
    agents = {sender: Agent(tmp_path, sender, bundles[sender], f"127.0.0.1:{port}",
                            [{"name": "video", "role": "sender", "relay_listen": f"127.0.0.1:{listen}"}]),
              receiver: Agent(tmp_path, receiver, bundles[receiver], f"127.0.0.1:{port}",
                              [{"name": "video", "role": "receiver", "relay_deliver": f"127.0.0.1:{deliver}"}])}
    return agents, listen, deliver
