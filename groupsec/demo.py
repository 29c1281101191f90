"""``groupsec demo``: the whole system, live, on loopback, with no set-up and no root.

In a temporary directory it creates a controller home, one sender and N receivers
(``groupsec member add``), starts ``groupsec serve`` and one ``groupsec-agent run`` per member
as separate processes (userspace data path, ESP-in-UDP on loopback multicast), and streams a
numbered feed through the sender's plaintext relay for ``--duration`` seconds. The controller
rolls the traffic keys over every ``--rekey-interval`` seconds; half-way through, the last
receiver is revoked (``groupsec member revoke``) and evicted live.

The demo watches the wire itself (a passive socket joined to the group: it sees exactly what
an eavesdropper on the link sees) and reads the controller's state for the SAs, so it can say
which key every packet travelled under. It exits 0 only if:

* every packet sent reached every receiver that was not evicted;
* the evicted receiver decrypted nothing sent under keys made after its eviction (and the
  sender did move to such keys);
* no receiver counted an authentication failure.

``--json`` prints the summary as one object; ``--pcap``/``--keys`` write the wire traffic and
the SAs (Wireshark ``esp_sa``) so the capture opens decrypted in Wireshark, tshark or
``groupsec inspect``.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groupsec import pcap, uat
from groupsec.errors import ConfigError
from groupsec.inspect import Inspector
from groupsec.ipsec.ip import build_udp_packet
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.suites import ESP_SUITES

GROUP = "demo"
ENCAP_PORT = 4500  # RFC 3948's port: Wireshark decodes it as ESP-in-UDP without being told
RATE = 50  # packets per second
MAGIC = b"groupsec-demo "
START_TIMEOUT = 30.0


def payload(seq: int) -> bytes:
    """The feed's packet number ``seq`` (the tests rebuild it to compare with what tshark decrypts)."""
    return MAGIC + b"seq=%08d " % seq + bytes((seq * 7 + i) & 0xFF for i in range(16 + seq % 48))


def parse_payload(data: bytes) -> int | None:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 12:
        return None
    try:
        seq = int(data[len(MAGIC) + 4:len(MAGIC) + 12])
    except ValueError:
        return None
    return seq if payload(seq) == data else None


@dataclass
class Member:
    name: str
    role: str
    deliver: socket.socket | None = None
    proc: subprocess.Popen[bytes] | None = None
    received: set[int] = field(default_factory=set)
    duplicates: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    evicted: bool = False


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "groupsec.cli", *args]


class Demo:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.home = workdir / "controller"
        rnd = secrets.randbelow(250 * 250)
        self.group_addr = str(ipaddress.IPv4Address("239.193.0.0") + (rnd // 250) * 256 + rnd % 250 + 1)
        self.rekey_port = _free_udp_port()
        self.sender = Member("sender", "sender")
        self.receivers = [Member(f"receiver-{i + 1}", "receiver") for i in range(args.receivers)]
        self.members = [self.sender, *self.receivers]
        self.controller: subprocess.Popen[bytes] | None = None
        self.relay_port = _free_udp_port()
        self.sent = 0
        self.send_spi: dict[int, int] = {}  # seq -> SPI it travelled under (seen on the wire)
        self.sas: dict[int, tuple[SAParams, float]] = {}  # spi -> (SA, controller creation time)
        self.wire: list[tuple[float, bytes]] = []  # (time, IP packet) as seen on the link
        self.evict_time: float | None = None
        self.events: list[str] = []
        self.tap: socket.socket | None = None
        self.inspector: Inspector | None = None
        # what differs in `groupsec lab` (raw ESP in namespaces)
        self.prog = "demo"
        self.listen = "127.0.0.1:0"
        self.rekey_interface = "lo"
        self.encap_port = ENCAP_PORT  # 0: raw ESP
        self.sender_policy = "shared"
        self.init_args: list[str] = []
        self.start_timeout = START_TIMEOUT
        self._revoke: tuple[Member, subprocess.Popen[str]] | None = None
        self._evict_epoch = 0

    # --- set-up ------------------------------------------------------------------------------

    def _run(self, *args: str) -> str:
        try:
            res = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{self.prog} set-up: `groupsec {' '.join(args[:2])}` took more than "
                              f"{self.start_timeout:.0f} s") from None
        if res.returncode != 0:
            raise ConfigError(f"{self.prog} set-up: `groupsec {' '.join(args[:2])}` failed: {res.stderr.strip()}")
        return res.stdout

    def setup(self) -> None:
        a = self.args
        self._run("init", str(self.home), *self.init_args)
        atd, dtd = min(1.0, a.rekey_interval / 5), min(2.0, a.rekey_interval / 4)
        counter = a.suite.startswith(("aes-gcm", "aes-gmac", "chacha")) and self.sender_policy == "shared"
        (self.home / "groupsec.toml").write_text(f"""\
# written by groupsec {self.prog}
[controller]
listen = "{self.listen}"
heartbeat_interval = 1.0
advertise = false
rekey_interface = "{self.rekey_interface}"

[groups.{GROUP}]
dst = "{self.group_addr}"
protocol = "udp"
port = 5004
protection = "esp"
suite = "{a.suite}"
mode = "tunnel"
tek_lifetime = {a.rekey_interval + atd + dtd}
kek_lifetime = 86400
atd = {atd}
dtd = {dtd}
replay_window = 128
sender_policy = "{self.sender_policy}"
sender_id_bits = {8 if counter else 0}
rekey_channel = "{self.group_addr.rsplit('.', 1)[0]}.255:{self.rekey_port}"
udp_encap_port = {self.encap_port}
""")
        for m in self.members:
            self._run("member", "add", m.name, "--group", f"{GROUP}:{m.role}", "--out", str(self.dir / f"{m.name}.bundle"),
                      "--dir", str(self.home))

    def start(self) -> None:
        port_file = self.dir / "controller.port"
        self.controller = subprocess.Popen(
            _cli("serve", "--dir", str(self.home), "--no-advertise", "--port-file", str(port_file)),
            stdout=(self.dir / "controller.log").open("wb"), stderr=subprocess.STDOUT)
        port = self._wait(lambda: port_file.exists() and port_file.read_text().strip(), "the controller to listen")
        for m in self.members:
            if m.role == "receiver":
                m.deliver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                m.deliver.bind(("127.0.0.1", 0))
                m.deliver.setblocking(False)
                relay = f"{GROUP}=-,127.0.0.1:{m.deliver.getsockname()[1]}"
            else:
                relay = f"{GROUP}=127.0.0.1:{self.relay_port},-"
            m.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--bundle", str(self.dir / f"{m.name}.bundle"),
                 "--controller", f"127.0.0.1:{port}", "--group", f"{GROUP}:{m.role}", "--relay", relay,
                 "--interface", "lo", "--state-dir", str(self.dir / m.name)],
                stdout=(self.dir / f"{m.name}.log").open("wb"), stderr=subprocess.STDOUT)
        self._open_tap()
        self._wait(lambda: all(self._ready(m) for m in self.members), "the agents to register")
        self.events.append(f"controller and {len(self.members)} agents up; group {self.group_addr}")

    def _ready(self, m: Member) -> bool:
        self._read_status(m)
        groups = m.status.get("agent", {}).get("groups", [])
        return bool(m.status.get("agent", {}).get("connected")) and any(
            s.get("direction") == ("out" if m.role == "sender" else "in") for g in groups for s in g.get("sas", []))

    def _wait(self, cond: Any, what: str) -> Any:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for p in [self.controller, *(m.proc for m in self.members)]:
                if p is not None and p.poll() is not None:
                    raise ConfigError(f"{self.prog}: a process exited early while waiting for {what}; "
                                      f"logs in {self.dir}")
            v = cond()
            if v:
                return v
            time.sleep(0.1)
        raise ConfigError(f"{self.prog}: timed out waiting for {what}; logs in {self.dir}")

    def _open_tap(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((self.group_addr, ENCAP_PORT))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                     socket.inet_aton(self.group_addr) + socket.inet_aton("127.0.0.1"))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
        self.tap = s

    # --- observing ---------------------------------------------------------------------------

    def _read_status(self, m: Member) -> None:
        try:
            m.status = json.loads((self.dir / m.name / "status.json").read_text())
        except (OSError, ValueError):
            pass

    def _level_state(self) -> dict[str, Any]:
        from groupsec.controller.store import SQLiteStore

        store = SQLiteStore(self.home / "state.db")
        try:
            return store.get(f"level/{GROUP}/") or {}
        finally:
            store.close()

    def _poll_sas(self) -> None:
        st = self._level_state()
        new = False
        for gen in st.get("gens", []):
            for d in [gen.get("group_sa"), *gen.get("sender_sas", {}).values()]:
                if d and d["spi"] not in self.sas:
                    self.sas[d["spi"]] = (SAParams.from_dict(d), float(gen["created"]))
                    new = True
        if new or self.inspector is None:
            self.inspector = Inspector(uat.parse_esp_sa_untrusted(uat.format_esp_sa(p for p, _ in self.sas.values())))

    def _drain(self) -> None:
        self._drain_wire()
        self._drain_receivers()

    def _drain_wire(self) -> None:
        assert self.tap is not None
        while True:
            try:
                data, (src, sport) = self.tap.recvfrom(65535)
            except BlockingIOError:
                break
            now = time.time()
            self.wire.append((now, build_udp_packet(src, self.group_addr, sport, ENCAP_PORT, data, ttl=1)))

    def _drain_receivers(self) -> None:
        for m in self.receivers:
            assert m.deliver is not None
            while True:
                try:
                    data = m.deliver.recv(65535)
                except BlockingIOError:
                    break
                seq = parse_payload(data)
                if seq is not None:
                    if seq in m.received:
                        m.duplicates += 1
                    m.received.add(seq)

    def _classify_wire(self) -> None:
        """Which SPI did each packet of the feed travel under (decrypted with the controller's SAs)?"""
        self._poll_sas()
        assert self.inspector is not None
        insp = Inspector(self.inspector.keys)
        for i, (ts, pkt) in enumerate(self.wire, 1):
            v = insp.feed(i, ts, pkt)
            if v is not None and v.verdict == "ok" and v.payload is not None and v.spi is not None:
                seq = parse_payload(v.payload)
                if seq is not None:
                    self.send_spi.setdefault(seq, v.spi)

    # --- the run -----------------------------------------------------------------------------

    def _open_tx(self) -> tuple[socket.socket, tuple[str, int]]:
        """The feed's source socket and where it sends (the sender's plaintext relay)."""
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("127.0.0.1", self.relay_port)

    def stream(self, view: Any = None) -> None:
        a = self.args
        tx, dest = self._open_tx()
        t0 = time.monotonic()
        evict_at = a.duration / 2 if len(self.receivers) >= 2 else None
        next_poll = 0.0
        last_spi: int | None = None
        try:
            while True:
                now = time.monotonic() - t0
                due = int(now * RATE)
                while self.sent <= due and self.sent < int(a.duration * RATE):
                    tx.sendto(payload(self.sent), dest)
                    self.sent += 1
                if now >= a.duration:  # the whole feed is out (due covers it by now)
                    break
                self._drain()
                if now >= next_poll:
                    next_poll = now + 0.5
                    self._poll_sas()
                    for m in self.members:
                        self._read_status(m)
                    spi = self._sender_spi()
                    if spi is not None and spi != last_spi:
                        if last_spi is not None:
                            self.events.append(f"{now:5.1f}s sender rolled over to SPI {spi:#010x}")
                        last_spi = spi
                    if view is not None:
                        view(self, now)
                if evict_at is not None and now >= evict_at:
                    evict_at = None
                    self._start_evict(self.receivers[-1], now)
                self._finish_evict(now)
                time.sleep(max(0.0, min(0.02, (self.sent / RATE) - (time.monotonic() - t0))))
            self._finish_evict(time.monotonic() - t0, wait=True)
            deadline = time.monotonic() + 1.5  # packets in flight
            while time.monotonic() < deadline:
                self._drain()
                time.sleep(0.05)
            for m in self.members:
                self._read_status(m)
        finally:
            tx.close()
        self._classify_wire()

    def _sender_spi(self) -> int | None:
        for g in self.sender.status.get("agent", {}).get("groups", []):
            for s in g.get("sas", []):
                if s.get("direction") == "out":
                    try:
                        return int(str(s.get("spi")), 0)
                    except ValueError:
                        return None
        return None

    def _start_evict(self, m: Member, now: float) -> None:
        """Revoke ``m`` with `groupsec member revoke` in the background: the feed goes on meanwhile
        (on a loaded machine the command takes seconds)."""
        self._evict_epoch = self._level_state().get("kek_epoch", 0)
        self._revoke = (m, subprocess.Popen(_cli("member", "revoke", m.name, "--dir", str(self.home)),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

    def _finish_evict(self, now: float, wait: bool = False) -> None:
        if self._revoke is None or (self._revoke[1].poll() is None and not wait):
            return
        m, proc = self._revoke
        _, err = proc.communicate(timeout=60)
        self._revoke = None
        if proc.returncode != 0:
            raise ConfigError(f"{self.prog}: `groupsec member revoke {m.name}` failed: {err.strip()}")
        m.evicted = True
        st = self._level_state()
        if st.get("kek_epoch", 0) > self._evict_epoch:
            # the controller's own eviction time: the new KEK and the eviction's TEKs carry it
            self.evict_time = float(st["kek_created"])
        else:
            self.events.append(f"{now:5.1f}s the controller did not start a new KEK epoch for the eviction")
            self.evict_time = time.time()
        self._poll_sas()
        self.events.append(f"{now:5.1f}s {m.name} revoked and evicted")

    def stop(self) -> None:
        if self._revoke is not None and self._revoke[1].poll() is None:
            self._revoke[1].kill()
            self._revoke[1].communicate()
        procs = [p for p in [*(m.proc for m in self.members), self.controller] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in [self.tap, *(m.deliver for m in self.receivers)]:
            if s is not None:
                s.close()

    # --- results -----------------------------------------------------------------------------

    def rollovers(self) -> int:
        spis = [self.send_spi[s] for s in sorted(self.send_spi)]
        return sum(1 for a, b in itertools.pairwise(spis) if a != b)

    def _post_eviction(self, seq: int) -> bool:
        spi = self.send_spi.get(seq)
        if spi is None or self.evict_time is None or spi not in self.sas:
            return False
        return self.sas[spi][1] >= self.evict_time

    def summary(self) -> tuple[dict[str, Any], list[str]]:
        problems: list[str] = []
        first_post = min((s for s in self.send_spi if self._post_eviction(s)), default=None)
        if self.evict_time is not None and first_post is None:
            problems.append("the sender never moved to keys made after the eviction")
        unseen = self.sent - len(self.send_spi)
        if unseen:
            problems.append(f"{unseen} packet(s) of the feed were not seen on the wire under a known SA")
        receivers = []
        for m in self.receivers:
            drops: dict[str, int] = {}
            for g in m.status.get("datapath", {}).get("groups", {}).values():
                for k, v in g.get("drops", {}).items():
                    drops[k] = drops.get(k, 0) + int(v)
            auth = drops.get("auth-failed", 0) + drops.get("source-auth-failed", 0)
            if m.evicted:
                expected = range(first_post if first_post is not None else self.sent)
                after = sum(1 for s in m.received if self._post_eviction(s))
            else:
                expected = range(self.sent)
                after = 0
            missing = [s for s in expected if s not in m.received]
            lost = len(missing)
            if lost and not m.evicted:
                problems.append(f"{m.name} lost {lost} packet(s): seq {_ranges(missing)}"
                                f" (SPIs {', '.join(sorted({f'{self.send_spi[s]:#010x}' for s in missing if s in self.send_spi}))})")
            if after:
                problems.append(f"{m.name} decrypted {after} packet(s) sent after its eviction")
            if auth:
                problems.append(f"{m.name} counted {auth} authentication failure(s)")
            receivers.append({"name": m.name, "received": len(m.received), "lost": lost, "auth_failures": auth,
                              "replays": drops.get("replay", 0) + m.duplicates, "evicted": m.evicted,
                              "received_after_eviction": after})
        return ({"ok": not problems, "sent": self.sent, "rollovers": self.rollovers(), "receivers": receivers},
                problems)

    def write_outputs(self) -> None:
        a = self.args
        if a.pcap:
            Path(a.pcap).write_bytes(pcap.pcap_bytes(self.wire, linktype=pcap.LINKTYPE_RAW))
        if a.keys:
            uat.write_esp_sa(a.keys, [p for p, _ in self.sas.values()])


def _ranges(seqs: list[int]) -> str:
    out: list[str] = []
    for s in seqs:
        if out and out[-1].split("-")[-1] == str(s - 1):
            out[-1] = out[-1].split("-")[0] + f"-{s}"
        else:
            out.append(str(s))
    return ", ".join(out[:8]) + (" ..." if len(out) > 8 else "")


# --- the live view ---------------------------------------------------------------------------


def _table(demo: Demo, now: float) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"groupsec {demo.prog}: {demo.group_addr}  {now:4.1f}/{demo.args.duration:.0f} s  "
              f"sent {demo.sent}", expand=False)
    for col in ("member", "state", "KEK/msg", "SAs", "delivered", "drops"):
        t.add_column(col, no_wrap=True)
    for m in demo.members:
        ag = m.status.get("agent", {})
        g = (ag.get("groups") or [{}])[0]
        sas = g.get("sas", [])
        n_in = len({s.get("spi") for s in sas if s.get("direction") == "in"})
        out = next((str(s.get("spi")) for s in sas if s.get("direction") == "out"), None)
        drops: dict[str, int] = {}
        for dg in m.status.get("datapath", {}).get("groups", {}).values():
            for k, v in dg.get("drops", {}).items():
                drops[k] = drops.get(k, 0) + int(v)
        state = "EVICTED" if m.evicted else ("connected" if ag.get("connected") else ag.get("state", "starting"))
        t.add_row(m.name, Text(state, style="red" if m.evicted else "green"),
                  f"{g.get('kek_epoch', '-')}/{g.get('msg_id', '-')}", f"out {out}" if out else f"{n_in} in",
                  str(len(m.received)) if m.role == "receiver" else f"{demo.sent} sent",
                  " ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "-")
    return Group(t, Text("\n".join(demo.events[-6:]), style="dim"))


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole system live on loopback (what `make demo` runs)",
                       description="Start a controller, one sender and N receivers as separate processes on "
                       "loopback multicast, stream a feed with scheduled rollovers, evict one receiver live, "
                       "and check that the right members got exactly the right packets. Needs no root.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The scenario's options (shared with `groupsec lab`)."""
    p.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds of streaming (default 20)")
    p.add_argument("--receivers", type=int, default=3, metavar="N", help="receivers (default 3; the last is evicted)")
    p.add_argument("--suite", default="aes-gcm-16-128", choices=ESP_SUITES, metavar="NAME",
                   help=f"ESP suite: {', '.join(ESP_SUITES)} (default aes-gcm-16-128)")
    p.add_argument("--rekey-interval", type=float, default=5.0, metavar="S",
                   help="seconds between scheduled traffic-key rollovers (default 5; the eviction adds one)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object, no live view")
    p.add_argument("--pcap", metavar="FILE", help="write the wire traffic (ESP-in-UDP) as a pcap")
    p.add_argument("--keys", metavar="FILE", help="write the SAs as Wireshark esp_sa lines (secret keys, 0600)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, homes)")


def check_arguments(args: argparse.Namespace) -> None:
    if not 2.0 <= args.duration <= 3600:
        raise ConfigError(f"--duration {args.duration}: must be 2..3600 seconds")
    if not 1 <= args.receivers <= 50:
        raise ConfigError(f"--receivers {args.receivers}: must be 1..50")
    if not 2.0 <= args.rekey_interval <= 3600:
        raise ConfigError(f"--rekey-interval {args.rekey_interval}: must be 2..3600 seconds")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    workdir = Path(tempfile.mkdtemp(prefix="groupsec-demo-"))
    return execute(Demo(args, workdir), args)


def execute(demo: Demo, args: argparse.Namespace) -> int:
    """Set up, start, stream (live view unless --json), stop, and report: shared by demo and lab."""
    workdir = demo.dir
    try:
        demo.setup()
        demo.start()
        if args.json:
            demo.stream()
        else:
            from rich.console import Console
            from rich.live import Live

            console = Console()
            with Live(_table(demo, 0.0), console=console, refresh_per_second=4, transient=False) as live:
                demo.stream(lambda d, now: live.update(_table(d, now)))
    finally:
        demo.stop()
    summary, problems = demo.summary()
    demo.write_outputs()
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary, problems)
    for p in problems:
        print(f"groupsec {demo.prog}: FAILED: {p}", file=sys.stderr)
    if args.keep or problems:
        print(f"groupsec {demo.prog}: logs and homes kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary["ok"] else 1


def _print_summary(summary: dict[str, Any], problems: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sent {summary['sent']} packets, {summary['rollovers']} rollovers: "
              + ("[green]OK[/]" if summary["ok"] else "[red]FAILED[/]"))
    for col in ("receiver", "received", "lost", "auth failures", "replays", "evicted", "after eviction"):
        t.add_column(col)
    for r in summary["receivers"]:
        t.add_row(r["name"], str(r["received"]), str(r["lost"]), str(r["auth_failures"]), str(r["replays"]),
                  "yes" if r["evicted"] else "no", str(r["received_after_eviction"]))
    console = Console()
    console.print()
    console.print(t)
    eve = summary.get("eavesdropper")
    if eve is not None:
        console.print(f"eavesdropper {eve['name']}: captured {eve['packets_captured']} packets "
                      f"({eve['esp_packets']} ESP/AH), {eve['cleartext_bytes']} payload bytes in the clear, "
                      f"decrypted {eve['decrypted']}, registered: {'yes' if eve['registered'] else 'no'}")
