"""``groupsec bench datapath``: the protected relay against the plaintext relay.

Both measurements run in the same invocation, over loopback multicast, with the same
process layout: a sender process (application generator + relay -> wire) and a receiver
process (wire -> relay -> application sink). The plaintext relay is the same relay code
with the engine's protection switched off (``agent.datapath.engine.PlainEngine``).

* ``plain_pps`` / ``protected_pps``: packets delivered to the sink application per second,
  first to last delivery;
* ``ratio`` = protected_pps / plain_pps;
* ``loss``: the fraction of the protected packets the sender put on the wire that the
  receiver did not deliver, over all rounds (the sender runs at its highest rate unless
  ``--rate``); ``worst_loss`` is the worst single round.

``plain_cpu_us``/``protected_cpu_us`` are the CPU time per packet of both processes
together, and ``cpu_ratio`` their ratio: other load on the machine disturbs these least.

The pps figures are the best round of each kind (the least disturbed by other work on the
machine); the ratio is best protected over best plaintext. Both kinds alternate, so slow
phases of a noisy machine hit both.

The worker processes are ``python -m agent.datapath.bench`` (groupsec never imports agent);
key material reaches them on stdin.

``--datapath xfrm`` (root, and a kernel with ESP and the suite's algorithm; otherwise it
exits 2 with the reason) measures the userspace relay exactly as above and, in the same
rounds, the kernel's path between two network namespaces on a bridge: a plain UDP sender
application in one, a plain UDP receiver application in the other, with the SA installed by
``XfrmDatapath`` (workers ``python -m agent.datapath.xfrm_bench``). Raw ESP, the same suite,
mode and payload size. Added fields:

* ``kernel_pps``: packets delivered to the receiving application per second over XFRM;
* ``kernel_plain_pps``: the same two namespaces and applications with no SA (the kernel's
  plaintext baseline), and ``kernel_ratio`` = kernel_pps / kernel_plain_pps;
* ``kernel_vs_userspace`` = kernel_pps / protected_pps: the kernel path against the
  userspace protected relay measured in the same run (the figure to track);
* ``kernel_loss`` (over all kernel rounds, against what the outbound SA encrypted),
  ``kernel_auth_failures``, and ``rounds.kernel`` / ``rounds.kernel_plain``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from groupsec.errors import ConfigError
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.policy import GroupPolicy
from groupsec.ipsec.suites import ESP_SUITES, get_suite

DATAPATHS = ("userspace", "xfrm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datapath", default="userspace", choices=DATAPATHS, help="the data path to measure")
    p.add_argument("--suite", default="aes-gcm-16-128", choices=ESP_SUITES, help="ESP suite of the protected run")
    p.add_argument("--mode", default="tunnel", choices=("tunnel", "transport"))
    p.add_argument("--size", type=int, default=1400, help="application payload bytes")
    p.add_argument("--count", type=int, default=30000, help="packets per measurement")
    p.add_argument("--rate", type=float, default=0.0, help="sender rate in packets/s (0: as fast as it can)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate plain/protected this many times; the best of each is reported")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _install(suite: str, mode: str, group: str, encap: int | None, port: int) -> dict[str, Any]:
    s = get_suite(suite, "esp")
    pol = GroupPolicy(group="bench", dst=group, suite=suite, mode=mode, port=port, udp_encap_port=encap)  # type: ignore[arg-type]
    sa = SAParams(spi=int.from_bytes(os.urandom(4), "big") | 0x1000, protocol="esp", suite=suite,
                  mode=mode, dst=group, enc_key=os.urandom(s.enc_key_len),  # type: ignore[arg-type]
                  auth_key=os.urandom(s.auth_key_len), udp_encap_port=encap, group="bench")
    d = sa.to_dict()
    d["enc_key"], d["auth_key"] = sa.enc_key.hex(), sa.auth_key.hex()
    return {"policy": pol.to_dict(), "inbound": [d], "outbound": d}


def _worker(role: str, spec: dict[str, Any], module: str = "agent.datapath.bench",
            prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """``prefix``: for example ("ip", "netns", "exec", NAME) to start it in a namespace."""
    # the checkout that holds this groupsec also holds agent/ (it works uninstalled, too)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([*prefix, sys.executable, "-m", module, role], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    return proc


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise ConfigError(f"bench worker exited with code {proc.returncode} before answering")
    return json.loads(line)  # type: ignore[no-any-return]


def measure(mode: str, args: argparse.Namespace, kernel: tuple[str, str] | None = None) -> dict[str, Any]:
    """One measurement: a fresh receiver and sender process pair, fresh keys and ports.
    ``kernel``: (sender namespace, receiver namespace) to measure the XFRM path there
    instead (``mode`` "protected" installs the SA, "plain" does not)."""
    b = os.urandom(2)
    group = f"239.{200 + b[0] % 50}.{b[1]}.{1 + os.urandom(1)[0] % 250}"
    encap, port = (None, 5004) if kernel else (_free_port(), _free_port())  # the kernel: raw ESP
    spec = {"mode": mode, "install": _install(args.suite, args.mode, group, encap, port), "size": args.size,
            "count": args.count, "rate": args.rate, "group_port": port, "xfrm": mode == "protected",
            "timeout": 300.0}  # until the first packet: a sender process starts slowly in a TCG VM
    module = "agent.datapath.xfrm_bench" if kernel else "agent.datapath.bench"
    tx, rx = (("ip", "netns", "exec", kernel[0]), ("ip", "netns", "exec", kernel[1])) if kernel else ((), ())
    recv = _worker("recv", spec, module, rx)
    send = None
    try:
        send = _worker("send", spec, module, tx)  # both start at once; the sender waits for "go"
        _line(recv)
        _line(send)
        assert send.stdin is not None
        send.stdin.write("go\n")
        send.stdin.flush()
        sent = _line(send)
        got = _line(recv)
    finally:
        for p in (send, recv):
            if p is not None:
                if p.stdin is not None:
                    p.stdin.close()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                if p.stdout is not None:
                    p.stdout.close()
    pps = got["delivered"] / got["seconds"] if got["seconds"] > 0 else 0.0
    wire_sent = sent["wire_sent"]
    auth = sum(int(sa.get("drops", {}).get("auth-failed", 0)) for sa in got.get("sas", []))
    cpu_us = 1e6 * (sent["cpu_seconds"] / max(1, wire_sent) + got["cpu_seconds"] / max(1, got["delivered"]))
    return {"pps": pps, "sent": wire_sent, "delivered": got["delivered"], "send_seconds": sent["seconds"],
            "cpu_us": cpu_us,
            "loss": (wire_sent - got["delivered"]) / wire_sent if wire_sent else 1.0, "auth_failures": auth,
            "receiver_drops": got["drops"], "relay_drops": sent["relay_drops"]}


def xfrm_refusal(suite: str) -> str | None:
    """Why the kernel path cannot be measured here (one line), or None."""
    from groupsec.lab import xfrm_refusal as kernel_refusal
    from groupsec.netns import missing_privilege

    why = missing_privilege()
    return why if why is not None else kernel_refusal(suite)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.datapath not in DATAPATHS:
        raise ConfigError(f"--datapath {args.datapath!r} is not one of {', '.join(DATAPATHS)}")
    if not 16 <= args.size <= 8000:
        raise ConfigError(f"--size {args.size} is outside 16..8000")
    if args.datapath == "xfrm" and (why := xfrm_refusal(args.suite)) is not None:
        raise ConfigError(f"bench datapath --datapath xfrm: {why}")
    lan = None
    kernel: tuple[str, str] | None = None
    if args.datapath == "xfrm":
        from groupsec.netns import Lan

        lan = Lan(tag="gsbx")
        try:
            tx, rx = lan.add("tx"), lan.add("rx")
            for ns in (tx, rx):  # plain applications: the routing table sends the group out of eth0
                ns.ip("route", "add", "239.0.0.0/8", "dev", "eth0")
        except BaseException:
            lan.close()
            raise
        kernel = (tx.name, rx.name)
    plain: list[dict[str, Any]] = []
    prot: list[dict[str, Any]] = []
    kplain: list[dict[str, Any]] = []
    kprot: list[dict[str, Any]] = []
    try:
        for _ in range(max(1, args.rounds)):
            plain.append(measure("plain", args))
            prot.append(measure("protected", args))
            if kernel is not None:
                kplain.append(measure("plain", args, kernel))
                kprot.append(measure("protected", args, kernel))
    finally:
        if lan is not None:
            lan.close()
    best_plain = max(plain, key=lambda r: r["pps"])
    best_prot = max(prot, key=lambda r: r["pps"])
    out = {"bench": "datapath", "datapath": args.datapath, "suite": args.suite, "mode": args.mode,
            "size": args.size, "count": args.count,
            "plain_pps": round(best_plain["pps"], 1), "protected_pps": round(best_prot["pps"], 1),
            "ratio": round(best_prot["pps"] / best_plain["pps"], 3) if best_plain["pps"] else 0.0,
            # every protected packet sent in every round counts, not only the fastest round's
            "loss": round(sum(r["sent"] - r["delivered"] for r in prot) / max(1, sum(r["sent"] for r in prot)), 6),
            "worst_loss": round(max(r["loss"] for r in prot), 6),
            "plain_loss": round(best_plain["loss"], 6),
            "auth_failures": sum(r["auth_failures"] for r in prot),
            # CPU time per packet (sender + receiver process), the figure that other load on the
            # machine disturbs least; cpu_ratio = what the pps ratio would be if both were CPU-bound
            "plain_cpu_us": round(min(r["cpu_us"] for r in plain), 2),
            "protected_cpu_us": round(min(r["cpu_us"] for r in prot), 2),
            "cpu_ratio": round(min(r["cpu_us"] for r in plain) / min(r["cpu_us"] for r in prot), 3),
            "rounds": {"plain": [round(r["pps"], 1) for r in plain], "protected": [round(r["pps"], 1) for r in prot]}}
    if kprot:
        kp, kb = max(kprot, key=lambda r: r["pps"]), max(kplain, key=lambda r: r["pps"])
        out.update({
            "kernel_pps": round(kp["pps"], 1), "kernel_plain_pps": round(kb["pps"], 1),
            "kernel_ratio": round(kp["pps"] / kb["pps"], 3) if kb["pps"] else 0.0,
            "kernel_vs_userspace": round(kp["pps"] / best_prot["pps"], 3) if best_prot["pps"] else 0.0,
            "kernel_loss": round(sum(r["sent"] - r["delivered"] for r in kprot) / max(1, sum(r["sent"] for r in kprot)),
                                 6),
            "kernel_auth_failures": sum(r["auth_failures"] for r in kprot)})
        out["rounds"].update(kernel=[round(r["pps"], 1) for r in kprot],
                             kernel_plain=[round(r["pps"], 1) for r in kplain])
    return out


def render(r: dict[str, Any]) -> str:
    lines = [
        f"datapath bench ({r['datapath']}, {r['suite']} {r['mode']}, {r['size']}-byte payloads, "
        f"{r['count']} packets per run)",
        f"  plaintext relay   {r['plain_pps']:>10.0f} pkt/s   (loss {r['plain_loss']:.4%})",
        f"  protected relay   {r['protected_pps']:>10.0f} pkt/s   (loss {r['loss']:.4%}, worst round {r['worst_loss']:.4%},"
        f" auth failures {r['auth_failures']})",
        f"  ratio             {r['ratio']:>10.3f}   (target >= 0.8; loss target < 0.1%)",
        f"  CPU per packet    {r['plain_cpu_us']:.2f} us plaintext, {r['protected_cpu_us']:.2f} us protected"
        f" (sender + receiver; ratio {r['cpu_ratio']:.3f})",
    ]
    if "kernel_pps" in r:
        lines += [
            f"  kernel plaintext  {r['kernel_plain_pps']:>10.0f} pkt/s   (two namespaces on a bridge, no SA)",
            f"  kernel XFRM       {r['kernel_pps']:>10.0f} pkt/s   (loss {r['kernel_loss']:.4%}, auth failures "
            f"{r['kernel_auth_failures']}; ratio to kernel plaintext {r['kernel_ratio']:.3f})",
            f"  kernel/userspace  {r['kernel_vs_userspace']:>10.3f}   (kernel XFRM pps / protected relay pps)",
        ]
    return "\n".join(lines)
