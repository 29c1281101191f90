"""``groupsec bench failover``: kill the leader of 3 controllers under 1,000 pps.

A real 3-node etcd cluster on loopback (Debian's etcd-server), 3 ``groupsec serve --store
etcd://...`` processes, one sender and two receiver agents (``groupsec-agent run``, userspace
data path, a local relay) that know all three controllers. A stream of numbered datagrams
runs at ``--pps``; after ``--before`` seconds the leader gets SIGKILL. Reported:

* ``failover_ms``: from the SIGKILL until etcd shows another leader (target <= TTL + 1 s);
* ``lost``: datagrams the receivers' applications never got (target 0);
* ``kek_splits``: distinct KEKs held by the members at the end, minus one (target 0).
Baseline in the same run: ``ttl_ms``, the lease TTL the failover is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from groupsec.controller.etcd import EtcdClient
from groupsec.controller.etcdcluster import LocalEtcdCluster
from groupsec.controller.etcdstore import LEADER_KEY

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pps", type=int, default=1000)
    p.add_argument("--ttl", type=int, default=2, help="leader lease TTL in seconds (default 2)")
    p.add_argument("--before", type=float, default=2.0, help="seconds of traffic before the kill")
    p.add_argument("--after", type=float, default=5.0, help="seconds of traffic after the new leader")


def _port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


def _cli(*args: str) -> None:
    p = subprocess.run([sys.executable, "-m", "groupsec.cli", *args], env=ENV, capture_output=True, text=True,
                       timeout=60)
    if p.returncode:
        raise RuntimeError(f"groupsec {' '.join(args)}: {p.stderr[-500:]}")


def _wait(pred: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def _leader(c: EtcdClient) -> str | None:
    kv = c.get(LEADER_KEY)
    return json.loads(kv.value)["name"] if kv else None


def _status(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "status.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _group(d: Path) -> dict[str, Any] | None:
    st = _status(d)
    gs = st["agent"]["groups"] if st else []
    return gs[0] if gs and gs[0]["sas"] else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="groupsec-bench-failover-") as tmp:
        base = Path(tmp)
        with LocalEtcdCluster(3, base / "etcd") as cluster:
            return _run(args, base, cluster)


def _run(args: argparse.Namespace, base: Path, cluster: LocalEtcdCluster) -> dict[str, Any]:
    b = os.urandom(2)
    dst, rekey = f"239.{120 + b[0] % 50}.{b[1]}.7", f"239.{120 + b[0] % 50}.{b[1]}.8"
    ca = base / "ca"
    _cli("init", str(ca))
    (ca / "groupsec.toml").write_text(
        f'[controller]\nstate = "{cluster.url}"\nheartbeat_interval = 1.0\nrekey_interface = "lo"\nadvertise = false\n\n'
        f'[groups.video]\ndst = "{dst}"\nport = {_port()}\nprotocol = "udp"\nsuite = "aes-gcm-16-128"\n'
        f'mode = "tunnel"\nsender_id_bits = 8\nrekey_channel = "{rekey}:{_port()}"\nudp_encap_port = {_port()}\n'
        'tek_lifetime = 6.0\natd = 0.5\ndtd = 1.0\n')
    names = ["ctl-0", "ctl-1", "ctl-2"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    agents: list[subprocess.Popen[bytes]] = []
    etcd = EtcdClient(cluster.endpoints)
    try:
        ports = []
        for n in names:
            _cli("controller", "add", n, "--out", str(base / n), "-d", str(ca))
            pf = base / f"{n}.port"
            with open(base / f"{n}.log", "wb") as log:
                procs[n] = subprocess.Popen(
                    [sys.executable, "-m", "groupsec.cli", "serve", "-d", str(base / n), "--store", cluster.url,
                     "--name", n, "--lease-ttl", str(args.ttl), "--listen", "127.0.0.1:0", "--no-advertise",
                     "--port-file", str(pf)], env=ENV, stdout=log, stderr=subprocess.STDOUT)
            ports.append(int(_wait(lambda pf=pf: pf.exists() and pf.read_text().strip(), 30, f"{n} to listen")))
        url = ",".join(f"127.0.0.1:{p}" for p in ports)
        listen, deliver = _port(), {"bob": _port(), "carol": _port()}
        socks = {}
        for n, p in deliver.items():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind(("127.0.0.1", p))
            s.settimeout(0.2)
            socks[n] = s
        dirs = {}
        for n, role in (("alice", "sender"), ("bob", "receiver"), ("carol", "receiver")):
            _cli("member", "add", n, "--group", f"video:{role}", "-d", str(ca), "--out", str(base / f"{n}.bundle"))
            d = dirs[n] = base / f"agent-{n}"
            d.mkdir()
            relay = (f'relay_listen = "127.0.0.1:{listen}"' if role == "sender"
                     else f'relay_deliver = "127.0.0.1:{deliver[n]}"')
            (d / "agent.toml").write_text(
                f'bundle = "{base / (n + ".bundle")}"\ncontroller = "{url}"\nstate_dir = "{d}"\n\n[session]\n'
                f'ack_jitter = 0.2\nreconnect_min = 0.2\nreconnect_max = 1.0\nstatus_interval = 0.2\n\n'
                f'[[group]]\nname = "video"\nrole = "{role}"\n{relay}\n')
            with open(d / "agent.log", "wb") as log:
                agents.append(subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config",
                                                str(d / "agent.toml")], env=ENV, stdout=log, stderr=subprocess.STDOUT))
        for n, d in dirs.items():
            _wait(lambda d=d: _group(d), 30, f"agent {n} to register")
        got: dict[str, set[int]] = {n: set() for n in socks}
        stop = threading.Event()
        sent = [0]

        def recv(n: str) -> None:
            while not stop.is_set() or time.monotonic() < drain_until[0]:
                try:
                    data = socks[n].recv(2048)
                except (TimeoutError, OSError):
                    continue
                if data.startswith(b"FO"):
                    got[n].add(int(data[2:12]))

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                t0 = time.monotonic()
                while not stop.is_set():
                    due = int((time.monotonic() - t0) * args.pps)
                    while sent[0] < due:
                        s.sendto(b"FO%010d" % sent[0] + b"x" * 180, ("127.0.0.1", listen))
                        sent[0] += 1
                    time.sleep(0.002)

        drain_until = [float("inf")]
        threads = [threading.Thread(target=recv, args=(n,), daemon=True) for n in socks]
        threads.append(threading.Thread(target=send, daemon=True))
        for t in threads:
            t.start()
        time.sleep(args.before)
        old = _wait(lambda: _leader(etcd), 10, "a leader")
        t_kill = time.monotonic()
        procs[old].send_signal(signal.SIGKILL)
        procs[old].wait(10)
        new = _wait(lambda: (lambda x: x if x and x != old else None)(_leader(etcd)), args.ttl + 10, "a new leader")
        failover = time.monotonic() - t_kill
        time.sleep(args.after)
        stop.set()
        drain_until[0] = time.monotonic() + 1.5
        for t in threads:
            t.join(10)
        keks = {(_group(d) or {}).get("kek_id") for d in dirs.values()}
        lost = sum(1 for n in got for i in range(sent[0]) if i not in got[n])
        return {"bench": "failover", "controllers": 3, "failover_ms": round(failover * 1000, 1), "lost": lost,
                "kek_splits": len(keks) - 1, "ttl_ms": args.ttl * 1000, "pps": args.pps, "sent": sent[0],
                "old_leader": old, "new_leader": new}
    finally:
        for p in agents:
            p.terminate()
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in [*agents, *procs.values()]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        etcd.close()


def render(r: dict[str, Any]) -> str:
    return (f"failover: {r['controllers']} controllers, {r['pps']} pps, leader {r['old_leader']} killed -> "
            f"{r['new_leader']} in {r['failover_ms']} ms (lease TTL {r['ttl_ms']} ms)\n"
            f"  lost {r['lost']} of {r['sent']} per receiver x2, KEK splits {r['kek_splits']}")
