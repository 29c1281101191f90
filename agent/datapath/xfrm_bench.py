"""Worker processes for ``groupsec bench datapath --datapath xfrm``: the kernel data path.

    ip netns exec RX python -m agent.datapath.xfrm_bench recv   # plain app socket, inbound SA
    ip netns exec TX python -m agent.datapath.xfrm_bench send   # plain app socket, outbound SA

Each runs in its own network namespace (the two are joined by a bridge) and reads one JSON
line from stdin (the spec, with key material: never on the command line), prints one JSON
line when ready and one with its result at the end, in the format of
``agent.datapath.bench``'s workers. The applications are plain UDP sockets: with
``"xfrm": true`` an :class:`~agent.datapath.xfrm.XfrmDatapath` installs the spec's SA (the
kernel does ESP), with ``false`` nothing is installed (the kernel's plaintext baseline). The
data path is closed (SAs and policies removed) before the worker exits.

Spec keys: install (``bench.install_to_json``), xfrm, size, count, rate (0: as fast as the
socket takes them), group_port, interface (default eth0), timeout, idle.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
from dataclasses import replace
from typing import Any

from agent.datapath import sockets as so
from agent.datapath.bench import drain_count, install_from_json
from agent.datapath.xfrm import XfrmDatapath


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _datapath(spec: dict[str, Any], role: str) -> tuple[XfrmDatapath | None, Any]:
    inst = install_from_json(spec["install"])
    iface = so.resolve_interface(spec.get("interface", "eth0"))
    if not spec.get("xfrm", True):
        return None, iface
    dp = XfrmDatapath(interface=iface)
    dp.reconcile()
    dp.apply(replace(inst, outbound=None) if role == "recv" else replace(inst, inbound=()))
    return dp, iface


def _sa_stats(dp: XfrmDatapath | None) -> dict[str, Any]:
    """The kernel's counters for our SAs: totals and per SA (packets, drops by reason)."""
    if dp is None:
        return {"totals": {"packets": 0, "drops": {}}, "sas": []}
    return dp.statistics()


def recv(spec: dict[str, Any]) -> None:
    inst = install_from_json(spec["install"])
    group, port = inst.policy.dst, int(spec["group_port"])
    dp, iface = _datapath(spec, "recv")
    try:
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        app.bind((group, port))
        so.join_group(app, group, iface)
        app.setblocking(False)
        _emit({"ready": True})
        count = 0
        first = last = cpu0 = cpu1 = 0.0
        idle = float(spec.get("idle", 1.0))
        deadline = time.monotonic() + float(spec.get("timeout", 60.0))
        buf = bytearray(65536)
        while True:
            wait = idle if count else deadline - time.monotonic()
            if wait <= 0 or not select.select([app], [], [], wait)[0]:
                break
            if not count:
                cpu0 = time.process_time()
            count += drain_count(app, buf)
            last = time.monotonic()
            cpu1 = time.process_time()
            if not first:
                first = last
        st = _sa_stats(dp)
        _emit({"delivered": count, "seconds": last - first, "cpu_seconds": cpu1 - cpu0,
               "sa_packets": st["totals"]["packets"], "drops": st["totals"]["drops"], "sas": st["sas"]})
        app.close()
    finally:
        if dp is not None:
            dp.close()


def send(spec: dict[str, Any]) -> None:
    inst = install_from_json(spec["install"])
    group, port = inst.policy.dst, int(spec["group_port"])
    dp, _iface = _datapath(spec, "send")
    try:
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a plain application: the route picks eth0
        app.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        payload = os.urandom(int(spec["size"]))
        total, rate = int(spec["count"]), float(spec.get("rate") or 0)
        _emit({"ready": True})
        sys.stdin.readline()  # "go"
        start = time.monotonic()
        cpu0 = time.process_time()
        errors = 0
        for i in range(total):
            try:
                app.sendto(payload, (group, port))
            except OSError:  # ENOBUFS: the qdisc is full; count it like a drop
                errors += 1
            if rate and (delay := start + (i + 1) / rate - time.monotonic()) > 0:
                time.sleep(delay)
        seconds = time.monotonic() - start
        cpu = time.process_time() - cpu0
        wire = _sa_stats(dp)["totals"]["packets"] if dp is not None else total - errors
        _emit({"app_sent": total, "wire_sent": wire, "seconds": seconds, "cpu_seconds": cpu,
               "relay_drops": {"send-error": errors} if errors else {}})
        app.close()
    finally:
        if dp is not None:
            dp.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.datapath.xfrm_bench", description=__doc__.splitlines()[0])
    p.add_argument("role", choices=["send", "recv"])
    args = p.parse_args(argv)
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("no spec on stdin")
    (send if args.role == "send" else recv)(json.loads(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
