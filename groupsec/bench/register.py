"""``groupsec bench register``: N members register over TLS 1.3 (mutual ECDSA P-256) with a
controller running as its own process; the clients run in several other processes.

The figure that matters is registrations per second and the latency distribution; the
cost is the TLS handshakes (two ECDSA signatures and verifications plus an ECDHE per
member). Baseline in the same run: the time this machine needs for those handshakes'
raw crypto alone (``crypto_ms_per_handshake``), so a reader can see how much is overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from groupsec.controller import pki
from groupsec.controller.config import load_config
from groupsec.controller.loadclient import enrol_many
from groupsec.controller.store import SQLiteStore

BENCH_CONFIG = """
[controller]
listen = "127.0.0.1:0"
advertise = false
handshake_timeout = 60.0
idle_timeout = 600.0
max_connections = 50000

[groups.bench]
dst = "239.9.9.9"
port = 5004
rekey_channel = "239.9.9.255:17599"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--members", type=int, default=1000, help="members that register (default 1000)")
    p.add_argument("--processes", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--concurrency", type=int, default=24,
                   help="registrations in flight per client process (default 24: more only queues)")


def _crypto_baseline(n: int = 200) -> float:
    """ms of raw crypto per mutual-auth handshake: 2 ECDSA P-256 signs + 2 verifies + 1 X25519 each side."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, x25519

    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    t0 = time.perf_counter()
    for _ in range(n):
        for _side in range(2):
            sig = key.sign(b"transcript", ec.ECDSA(hashes.SHA256()))
            pub.verify(sig, b"transcript", ec.ECDSA(hashes.SHA256()))
            a, b = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
            a.exchange(b.public_key())
        pub.verify(sig, b"transcript", ec.ECDSA(hashes.SHA256()))  # chain checks
        pub.verify(sig, b"transcript", ec.ECDSA(hashes.SHA256()))
    return (time.perf_counter() - t0) * 1000 / n


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def setup_home(base: Path, members: int, processes: int, config: str = BENCH_CONFIG,
               groups: list[list[str]] | None = None) -> tuple[Path, list[Path]]:
    home = base / "home"
    home.mkdir(mode=0o700)
    pki.init_pki(home, [])
    (home / "groupsec.toml").write_text(config)
    cfg = load_config(home / "groupsec.toml")
    store = SQLiteStore(home / cfg.controller.state)
    files = []
    per = -(-members // processes)
    for i in range(processes):
        n = min(per, members - i * per)
        if n <= 0:
            break
        files.append(enrol_many(home, store, f"m{i}-", n, groups or [["bench", "receiver", ""]],
                                base / f"creds{i}"))
    store.close()
    return home, files


def start_controller(home: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = home / "port"
    port_file.unlink(missing_ok=True)
    with log.open("wb") as logf:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "groupsec.cli", "serve", "-d", str(home), "--no-advertise",
                                 "--port-file", str(port_file)], stdout=subprocess.DEVNULL, stderr=logf)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"controller did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def run_clients(home: Path, port: int, files: list[Path], group: str, concurrency: int) -> dict[str, Any]:
    procs = [subprocess.Popen([sys.executable, "-m", "groupsec.controller.loadclient", "--port", str(port),
                               "--ca", str(home / "ca.crt"), "--creds", str(f), "--group", group,
                               "--concurrency", str(concurrency), "--wait-stdin"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for f in files]
    for p in procs:
        assert p.stderr is not None
        line = p.stderr.readline()
        if b"ready" not in line:
            raise RuntimeError(f"load client failed: {line!r} {p.stderr.read()[-2000:]!r}")
    t0 = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"load client exited {p.returncode}: {err[-2000:]!r}")
        results.append(json.loads(out))
    seconds = time.perf_counter() - t0
    lat = sorted(x for r in results for x in r["latencies_ms"])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {"ok": len(lat), "failures": sum(r["failures"] for r in results), "seconds": seconds,
            "latencies_ms": lat, "errors": errors}


def _pct(lat: list[float], q: float) -> float:
    return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="groupsec-bench-") as tmp:
        base = Path(tmp)
        home, files = setup_home(base, args.members, args.processes)
        proc, port = start_controller(home, base / "controller.log")
        try:
            res = run_clients(home, port, files, "bench:receiver", args.concurrency)
            rss = _rss_mb(proc.pid)
        finally:
            proc.kill()
            proc.wait()
    lat = res["latencies_ms"]
    out = {"bench": "register", "members": args.members, "seconds": round(res["seconds"], 2),
           "per_second": round(res["ok"] / res["seconds"], 1) if res["seconds"] else 0.0,
           "p50_ms": _pct(lat, 0.50), "p99_ms": _pct(lat, 0.99), "failures": res["failures"],
           "controller_rss_mb": rss, "processes": args.processes, "concurrency": args.concurrency,
           "crypto_ms_per_handshake": round(_crypto_baseline(), 3), "cpus": os.cpu_count()}
    if res["errors"]:
        out["errors"] = res["errors"]
    return out


def render(r: dict[str, Any]) -> str:
    lines = [f"register: {r['members']} members from {r['processes']} processes x {r['concurrency']} concurrent",
             f"  {r['seconds']} s, {r['per_second']} registrations/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms,"
             f" failures {r['failures']}",
             f"  controller peak RSS {r['controller_rss_mb']} MB; raw handshake crypto {r['crypto_ms_per_handshake']}"
             f" ms (both sides) on {r['cpus']} CPUs"]
    if r.get("errors"):
        lines.append(f"  errors: {r['errors']}")
    return "\n".join(lines)
