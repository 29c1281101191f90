"""``groupsec bench rekey --agents N``: the time from an operator's rekey until each agent has
installed the new SAs.

A controller runs as its own process; N real agent sessions (``agent.rekeyload``: TLS 1.3
registration, the multicast rekey channel on loopback, signature and KEK checks, the member
state machine) run in a few other processes with a recording data path. After every agent
registered, the bench sends the same request as ``groupsec rekey GROUP`` to the controller's
admin socket and takes the wall-clock time; each agent process reports when each of its
agents first held an SA it did not have before. Baseline in the same run: the time the
controller needs to answer the rekey request (``request_ms``), which bounds how much of the
latency is the controller's own work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from groupsec.bench.register import _pct, setup_home, start_controller
from groupsec.controller.home import admin_request

CONFIG = """
[controller]
listen = "127.0.0.1:0"
advertise = false
handshake_timeout = 120.0
idle_timeout = 600.0
max_connections = 50000
heartbeat_interval = 5.0
rekey_interface = "lo"

[groups.bench]
dst = "239.9.8.1"
port = 5004
rekey_channel = "239.9.8.255:{rekey_port}"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", type=int, default=100, help="agents (default 100; the target is 500 within 2 s)")
    p.add_argument("--processes", type=int, default=4, help="agent processes (default 4)")


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="groupsec-bench-rekey-") as tmp:
        base = Path(tmp)
        home, files = setup_home(base, args.agents, args.processes, CONFIG.format(rekey_port=_free_udp_port()),
                                 groups=[["bench", "receiver", ""]])
        proc, port = start_controller(home, base / "controller.log")
        workers = []
        try:
            for f in files:
                with (base / f"{f.name}.log").open("wb") as log:
                    workers.append(subprocess.Popen(
                        [sys.executable, "-m", "agent.rekeyload", "--port", str(port), "--ca", str(home / "ca.crt"),
                         "--creds", str(f), "--group", "bench", "--timeout", "120"],
                        stdout=subprocess.PIPE, stderr=log))
            deadline = time.monotonic() + 300
            logs = [base / f"{f.name}.log" for f in files]
            while not all(b"ready" in p.read_bytes() for p in logs):
                if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                    raise RuntimeError("agents did not register: " + logs[0].read_text(errors="replace")[-2000:])
                time.sleep(0.1)
            time.sleep(0.5)  # let the acks of registration settle
            t0 = time.time()
            reply = admin_request(home, {"op": "rekey", "group": "bench", "level": None, "kek": False})
            request_ms = (time.time() - t0) * 1000
            if not reply or not reply.get("ok"):
                raise RuntimeError(f"rekey request failed: {reply}")
            results = []
            for w in workers:
                out, _ = w.communicate(timeout=180)
                results.append(json.loads(out.decode().strip().splitlines()[-1]))
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
            proc.kill()
            proc.wait()
    lat = sorted((t - t0) * 1000 for r in results for t in r["installed_at"])
    missing = sum(r["missing"] for r in results)
    return {"bench": "rekey", "agents": args.agents, "p50_ms": _pct(lat, 0.50), "p99_ms": _pct(lat, 0.99),
            "all_ms": round(lat[-1], 1) if lat and not missing else None, "missing": missing,
            "request_ms": round(request_ms, 1), "processes": len(files)}


def render(r: dict[str, Any]) -> str:
    all_ms = "n/a (some agents never installed)" if r["all_ms"] is None else f"{r['all_ms']} ms"
    return (f"rekey: {r['agents']} agents in {r['processes']} processes\n"
            f"  from `groupsec rekey` to new SAs installed: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
            f"all {all_ms}; missing {r['missing']}\n"
            f"  the controller answered the rekey request in {r['request_ms']} ms")
