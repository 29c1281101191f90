"""``groupsec lab``: the demo's scenario over real raw ESP in network namespaces (root).

A bridge joins namespaces for the controller, the sender, N receivers and an eavesdropper.
``groupsec serve`` and one ``groupsec-agent run`` per member run as processes inside their
namespaces; the group has no ESP-in-UDP port (``udp_encap_port = 0``), so the feed crosses
the bridge as ESP directly in IPv4. Everything else is the demo's (:mod:`groupsec.demo`):
the feed, the scheduled rollovers, the live eviction, the summary and its verdict.

The eavesdropper holds no credentials from this controller (its agent carries a bundle from
another CA, which TLS refuses) and captures every frame on its bridge port (the bridge does
no multicast snooping, so it sees all the group's traffic). The summary adds what it got:
frames captured, ESP/AH packets among them, feed payload bytes seen in the clear (must be 0)
and packets its agent decrypted (must be 0).

``--datapath xfrm`` installs the SAs in the kernel instead: the applications send and receive
plain multicast on eth0 and the kernel's ESP protects it. It needs a kernel with the suite's
ESP transform; where it is missing the lab says so and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from groupsec import demo as scenario
from groupsec.demo import MAGIC, Demo, Member, parse_payload
from groupsec.errors import ConfigError
from groupsec.ipsec.suites import get_suite
from groupsec.netns import Lan, Netns, child_env, missing_privilege, sh

CONTROLLER_PORT = 7443
START_TIMEOUT = 180.0
RELAY_PORT, DELIVER_PORT = 16000, 16001  # inside each member's own namespace
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


class Lab(Demo):
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.prog = "lab"
        self.encap_port = 0  # raw ESP on the wire
        self.relay_port = RELAY_PORT
        self.start_timeout = START_TIMEOUT  # 7 Python processes; in a TCG VM each takes many seconds to start
        self.xfrm = args.datapath == "xfrm"
        if self.xfrm:  # Linux builds the IV from the sequence number: no sender IDs, one SA per sender
            self.sender_policy = "per-sender"
        self.lan: Lan | None = None
        self.ns: dict[str, Netns] = {}
        self.eve = Member("eavesdropper", "receiver")
        self.eve_frames = 0
        self.eve_esp = 0
        self.cleartext_packets = 0
        self.cleartext_bytes = 0

    # --- set-up ------------------------------------------------------------------------------

    def _run(self, *args: str) -> str:
        """`groupsec ARGS` in this process (the lab already runs as `groupsec`): a new interpreter
        costs tens of seconds in a TCG VM, and the set-up runs six of these commands."""
        rc, out, err = _cli_in_process(*args)
        if rc != 0:
            raise ConfigError(f"{self.prog} set-up: `groupsec {' '.join(args[:2])}` failed: {err.strip()}")
        return out

    def _start_evict(self, m: Member, now: float) -> None:
        """On the kernel data path (run in a VM where there is no kernel ESP), `groupsec member
        revoke` in a thread of this process: as a new process it took longer than the whole feed
        under TCG, so the eviction came after the last packet. (Not for userspace: at once, the
        eviction pre-empts the scheduled rollover due at the same moment in an 8 s run.)"""
        if not self.xfrm:
            super()._start_evict(m, now)
            return
        self._evict_epoch = self._level_state().get("kek_epoch", 0)
        self._revoke = (m, _InProcessCommand("member", "revoke", m.name, "--dir", str(self.home)))  # type: ignore[assignment]

    def setup(self) -> None:
        self.lan = Lan(tag="gslab")
        ctl = self.lan.add("ctl")
        self.ns = {m.name: self.lan.add(m.name) for m in self.members}
        self.ns[self.eve.name] = self.lan.add("eve")
        assert ctl.address is not None
        self.ns["controller"] = ctl
        self.listen = f"{ctl.address}:{CONTROLLER_PORT}"
        self.rekey_interface = "eth0"
        self.init_args = ["--host", ctl.address]
        super().setup()
        # the eavesdropper: a perfectly good bundle, but from another controller's CA
        other = self.dir / "other-controller"
        self._run("init", str(other))
        (other / "groupsec.toml").write_text((self.home / "groupsec.toml").read_text())
        self._run("member", "add", self.eve.name, "--group", f"{scenario.GROUP}:receiver",
                  "--out", str(self.dir / f"{self.eve.name}.bundle"), "--dir", str(other))

    def start(self) -> None:
        ctl = self.ns["controller"]
        port_file = self.dir / "controller.port"
        self.controller = subprocess.Popen(
            ctl.command(sys.executable, "-m", "groupsec.cli", "serve", "--dir", str(self.home), "--no-advertise",
                        "--port-file", str(port_file)),
            env=child_env(), stdout=(self.dir / "controller.log").open("wb"), stderr=subprocess.STDOUT)
        self._wait(lambda: port_file.exists() and port_file.read_text().strip(), "the controller to listen")
        for m in [*self.members, self.eve]:
            ns = self.ns[m.name]
            cmd = [sys.executable, "-m", "agent.cli", "run", "--bundle", str(self.dir / f"{m.name}.bundle"),
                   "--controller", self.listen, "--group", f"{scenario.GROUP}:{m.role}", "--interface", "eth0",
                   "--state-dir", str(self.dir / m.name)]
            if self.xfrm and m is not self.eve:
                cmd += ["--datapath", "xfrm"]
            else:
                cmd += ["--wire", "raw", "--relay", f"{scenario.GROUP}=" + (
                    f"127.0.0.1:{RELAY_PORT},-" if m.role == "sender" else f"-,127.0.0.1:{DELIVER_PORT}")]
            if m.role == "receiver":
                m.deliver = self._deliver_socket(ns)
            m.proc = subprocess.Popen(ns.command(*cmd), env=child_env(), stdout=(self.dir / f"{m.name}.log").open("wb"),
                                      stderr=subprocess.STDOUT)
        self._open_tap()
        self._wait(lambda: all(self._ready(m) for m in self.members), "the agents to register")
        self.events.append(f"controller and {len(self.members)} agents up in namespaces; group {self.group_addr}, "
                           f"raw ESP, {'kernel XFRM' if self.xfrm else 'userspace'} data path")

    def _deliver_socket(self, ns: Netns) -> socket.socket:
        """Where a receiver's application reads the feed, inside the receiver's namespace."""
        with ns.entered():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        if self.xfrm and ns is not self.ns[self.eve.name]:  # plain multicast, protected by the kernel
            assert ns.address is not None
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.group_addr, 5004))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                         socket.inet_aton(self.group_addr) + socket.inet_aton(ns.address))
        else:
            s.bind(("127.0.0.1", DELIVER_PORT))
        s.setblocking(False)
        return s

    def _open_tx(self) -> tuple[socket.socket, tuple[str, int]]:
        ns = self.ns[self.sender.name]
        with ns.entered():
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if not self.xfrm:
            return tx, ("127.0.0.1", RELAY_PORT)
        assert ns.address is not None
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ns.address))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        return tx, (self.group_addr, 5004)

    def _open_tap(self) -> None:
        """The eavesdropper's capture: every frame arriving on its bridge port."""
        with self.ns[self.eve.name].entered():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind(("eth0", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.setblocking(False)
        self.tap = s

    # --- observing ---------------------------------------------------------------------------

    def _drain_wire(self) -> None:
        assert self.tap is not None
        while True:
            try:
                frame, addr = self.tap.recvfrom(65535)
            except BlockingIOError:
                break
            if addr[2] == PACKET_OUTGOING:
                continue  # the eavesdropper's own frames (its agent's attempts, IGMP)
            self.eve_frames += 1
            self._count_cleartext(frame)
            if frame[12:14] == b"\x08\x00" and len(frame) >= 34 and frame[23] in (50, 51):  # IPv4 ESP/AH
                ip = frame[14:14 + int.from_bytes(frame[16:18], "big")]
                self.eve_esp += 1
                self.wire.append((time.time(), ip))

    def _count_cleartext(self, frame: bytes) -> None:
        i, found = frame.find(MAGIC), False
        while i >= 0:
            found = True
            seq = parse_payload(frame[i:])  # a whole feed payload (it ends the frame) or just the marker
            self.cleartext_bytes += len(scenario.payload(seq)) if seq is not None else len(MAGIC)
            i = frame.find(MAGIC, i + len(MAGIC))
        self.cleartext_packets += found

    def _drain_receivers(self) -> None:
        super()._drain_receivers()
        assert self.eve.deliver is not None
        while True:
            try:
                data = self.eve.deliver.recv(65535)
            except BlockingIOError:
                break
            if parse_payload(data) is not None:
                self.eve.received.add(len(self.eve.received))

    def _read_status(self, m: Member) -> None:
        """The kernel data path reports its counters per SA and per namespace, not per group as
        the userspace engine does: give the summary the member's drops in the engine's shape."""
        super()._read_status(m)
        dp = m.status.get("datapath")
        if isinstance(dp, dict) and dp.get("datapath") == "xfrm":
            m.status["datapath"] = {**dp, "groups": {scenario.GROUP: {"drops": xfrm_drops(dp)}}}

    # --- results -----------------------------------------------------------------------------

    def summary(self) -> tuple[dict[str, Any], list[str]]:
        summary, problems = super().summary()
        self._read_status(self.eve)
        registered = bool(self.eve.status.get("agent", {}).get("groups"))
        eve = {"name": self.eve.name, "packets_captured": self.eve_frames, "esp_packets": self.eve_esp,
               "cleartext_packets": self.cleartext_packets, "cleartext_bytes": self.cleartext_bytes,
               "decrypted": len(self.eve.received), "registered": registered}
        if self.eve_esp < self.sent:
            problems.append(f"the eavesdropper captured only {self.eve_esp} ESP/AH packets of {self.sent} sent")
        if self.cleartext_bytes:
            problems.append(f"the eavesdropper saw {self.cleartext_bytes} feed bytes in the clear")
        if eve["decrypted"]:
            problems.append(f"the eavesdropper decrypted {eve['decrypted']} packet(s)")
        if registered:
            problems.append("the eavesdropper registered with the controller")
        summary.update(ok=not problems, datapath=self.args.datapath, wire="esp", eavesdropper=eve)
        return summary, problems

    def stop(self) -> None:
        try:
            if self.eve.proc is not None and self.eve.proc.poll() is None:
                self.eve.proc.terminate()
            super().stop()
            if self.eve.proc is not None:
                try:
                    self.eve.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.eve.proc.kill()
                    self.eve.proc.wait()
            if self.eve.deliver is not None:
                self.eve.deliver.close()
        finally:
            if self.lan is not None:
                self.lan.close()
                self.lan = None


_CLI_LOCK = threading.Lock()


def _cli_in_process(*args: str) -> tuple[int, str, str]:
    """Run `groupsec ARGS` here: (exit code, stdout, stderr). Output is captured, so the lab's
    own output (the live view, --json) must not be written meanwhile: the set-up runs before it,
    and the eviction's one line is all `member revoke` prints."""
    from groupsec.cli import main  # not at import time: groupsec.cli imports this module

    out, err = io.StringIO(), io.StringIO()
    with _CLI_LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


class _InProcessCommand:
    """The part of subprocess.Popen that the demo's eviction uses, for a `groupsec` command run
    in a thread of this process."""

    def __init__(self, *args: str) -> None:
        self.returncode: int | None = None
        self._out = self._err = ""
        self._thread = threading.Thread(target=self._main, args=args, daemon=True)
        self._thread.start()

    def _main(self, *args: str) -> None:
        try:
            rc, self._out, self._err = _cli_in_process(*args)
        except (Exception, SystemExit) as exc:  # reported like a failed process: exit code and stderr
            rc, self._err = 1, f"{type(exc).__name__}: {exc}"
        self.returncode = rc

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("groupsec member revoke", timeout or 0)
        return self._out, self._err

    def kill(self) -> None:
        pass  # a thread cannot be killed; stop() then waits for it in communicate()


# the kernel's per-namespace XFRM counters (/proc/net/xfrm_stat) behind each of our drop reasons
KERNEL_DROPS = {"auth-failed": "XfrmInStateProtoError", "replay": "XfrmInStateSeqError"}


def xfrm_drops(stats: dict[str, Any]) -> dict[str, int]:
    """A member's drops on the kernel data path, from its ``XfrmDatapath.statistics()``.

    Each member has its own namespace, so the namespace's counters are the member's; they also
    keep what SAs deleted since counted, which the per-SA counters lose with the SA."""
    kernel = stats.get("kernel") or {}
    totals = (stats.get("totals") or {}).get("drops") or {}
    out = {k: max(int(totals.get(k, 0)), int(kernel.get(name, 0))) for k, name in KERNEL_DROPS.items()}
    return {k: v for k, v in out.items() if v}


def register(sub: Any) -> None:
    p = sub.add_parser("lab", help="the demo over real raw ESP in network namespaces, with an eavesdropper (root)",
                       description="Create a bridge and network namespaces for a controller, a sender, N receivers "
                       "and an eavesdropper; run the controller and the agents inside them with raw ESP on the "
                       "wire; stream a feed with scheduled rollovers, evict one receiver live, and check who got "
                       "what. Needs root (CAP_NET_ADMIN). Cleans everything up on exit and on Ctrl-C.")
    scenario.add_arguments(p)
    p.add_argument("--datapath", choices=("userspace", "xfrm"), default="userspace",
                   help="the members' data path: the userspace ESP engine (default) or the kernel's XFRM")
    p.set_defaults(func=run)


def xfrm_refusal(suite_name: str) -> str | None:
    """Why this kernel cannot run the lab on XFRM (an SA of the suite cannot be added), or None."""
    suite = get_suite(suite_name)
    sh("modprobe", "-q", "esp4", check=False)
    if suite.kind in ("aead", "gmac"):
        algo = ["aead", str(suite.xfrm_enc), "0x" + "11" * suite.enc_key_len, str(suite.icv_len * 8)]
    else:
        algo = ["enc", str(suite.xfrm_enc), "0x" + "11" * suite.enc_key_len,
                "auth-trunc", str(suite.xfrm_auth), "0x" + "22" * suite.auth_key_len, str(suite.icv_len * 8)]
    probe = Netns(f"gslab{os.urandom(3).hex()}-probe")  # a throwaway namespace: the dummy SA dies with it
    try:
        res = probe.ip("xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp",
                       "spi", "0x4753ffff", *algo, check=False)
    finally:
        probe.close()
    if res.returncode == 0:
        return None
    return (f"this kernel cannot hold an ESP SA for {suite.name} ({algo[1]}): "
            f"{res.stderr.strip() or 'ip xfrm state add failed'} (needs esp4 and the algorithm; "
            "the userspace data path works everywhere)")


def run(args: argparse.Namespace) -> int:
    scenario.check_arguments(args)
    reason = missing_privilege()
    if reason is None and args.datapath == "xfrm" and (why := xfrm_refusal(args.suite)) is not None:
        reason = f"--datapath xfrm: {why}"
    if reason is not None:
        raise ConfigError(reason)
    workdir = Path(tempfile.mkdtemp(prefix="groupsec-lab-"))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return scenario.execute(Lab(args, workdir), args)
    except KeyboardInterrupt:  # execute() has stopped the processes and deleted the namespaces
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        print("groupsec lab: interrupted; processes, namespaces and bridge removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
