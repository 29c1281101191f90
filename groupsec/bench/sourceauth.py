"""``groupsec bench sourceauth``: what source authentication costs, as a ratio of the same SA's
throughput without it (mode "none"), measured in the same run.

For each mode one sender SA seals ``--packets`` packets of ``--size`` bytes (through
``SigningSealer``; windows are flushed and counted) and a fresh receiver opens all of them
(through ``SourceVerifier``: its first packet of every window pays the signature check).
"none" is the bare ``SecurityAssociation.seal_esp`` / ``open_esp_untrusted``. The modes are
interleaved within each of ``--rounds`` rounds; pps figures are medians over the rounds, and
each ratio is the median of the per-round ratios against the baseline measured next to it.
Times are this thread's CPU time (``time.thread_time``), not wall time.
"""

from __future__ import annotations

import argparse
import os
import time
from statistics import median
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sourceauth import SigningSealer, SourceVerifier, public_key_bytes, trailer_len
from groupsec.ipsec.suites import ESP_SUITES, get_suite

TARGET = 0.5
# CPU time of this thread: on a shared machine, time the scheduler gives to other processes
# does not count against whichever mode happened to be running (wall time did)
_clock = time.thread_time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=1400, help="payload bytes (default 1400)")
    p.add_argument("--packets", type=int, default=20000, help="packets per measurement (default 8192; 'sign' uses 1/8)")
    p.add_argument("--window", type=int, action="append",
                   help="sign-batched window in packets (repeatable; default: 32, the library default, and 256, the maximum)")
    p.add_argument("--suite", default="aes-gcm-16-128", choices=ESP_SUITES)
    p.add_argument("--rounds", type=int, default=5)


def _params(suite: str, sender_id: int | None) -> SAParams:
    s = get_suite(suite, "esp")
    shared = s.counter_mode
    return SAParams(spi=0x5A5A, protocol="esp", suite=suite, mode="tunnel", dst="239.0.0.1",
                    enc_key=_KEYS[suite][0], auth_key=_KEYS[suite][1], sender_id_bits=8 if shared else 0,
                    sender_id=sender_id if shared else None, replay_window=4096)


_KEYS: dict[str, tuple[bytes, bytes]] = {}


def _measure(suite: str, mode: str, window: int, size: int, count: int, sk: Ed25519PrivateKey) -> tuple[float, float]:
    payload = os.urandom(size)
    out_sa = SecurityAssociation(_params(suite, 1), "out", 0.0)
    in_sa = SecurityAssociation(_params(suite, None), "in", 0.0)
    key_id = 1 if in_sa.params.sender_id_bits else in_sa.params.spi
    now = 0.0
    packets: list[bytes] = []
    if mode == "none":
        seal = out_sa.seal_esp
        t0 = _clock()
        for _ in range(count):
            packets.append(seal(4, payload, now))
        t_seal = _clock() - t0
        opener: Any = in_sa
    else:
        sealer = SigningSealer(out_sa, sk, mode, max_packets=window)
        seal_many = sealer.seal_esp
        extend = packets.extend
        t0 = _clock()
        for _ in range(count):
            extend(seal_many(4, payload, now))
        extend(sealer.flush())
        t_seal = _clock() - t0
        opener = SourceVerifier(in_sa, {key_id: public_key_bytes(sk)}, mode)
    if len(packets) != count:
        raise RuntimeError(f"{mode}: sealed {len(packets)} packets, expected {count}")
    open_ = opener.open_esp_untrusted
    t0 = _clock()
    for pkt in packets:
        open_(pkt, now)
    t_open = _clock() - t0
    return count / t_seal, count / t_open


def run(args: argparse.Namespace) -> dict[str, Any]:
    suite = args.suite
    s = get_suite(suite, "esp")
    _KEYS[suite] = (os.urandom(s.enc_key_len), os.urandom(s.auth_key_len))
    sk = Ed25519PrivateKey.generate()
    windows = args.window or [32, 256]
    cases = [("none", 0), ("sign", 0), *[("sign-batched", w) for w in windows]]
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in cases}
    for _ in range(max(1, args.rounds)):
        for mode, w in cases:
            n = max(64, args.packets // 8) if mode == "sign" else args.packets
            runs[(mode, w)].append(_measure(suite, mode, w, args.size, n, sk))
    base = runs[("none", 0)]
    results = []
    for mode, w in cases:
        r = runs[(mode, w)]
        seal_pps, open_pps = median(x[0] for x in r), median(x[1] for x in r)
        # each round's ratio against the baseline measured next to it, then the median
        seal_ratio = median(x[0] / b[0] for x, b in zip(r, base, strict=True))
        open_ratio = median(x[1] / b[1] for x, b in zip(r, base, strict=True))
        results.append({
            "mode": mode, "size": args.size, "window": w or None,
            "seal_pps": round(seal_pps), "open_pps": round(open_pps),
            "seal_ratio": round(seal_ratio, 3), "open_ratio": round(open_ratio, 3),
            "ratio_to_none": round(min(seal_ratio, open_ratio), 3),
            "overhead_bytes": trailer_len(mode, w or 1),
        })
    return {"bench": "sourceauth", "suite": suite, "rounds": args.rounds, "packets": args.packets, "target": TARGET,
            "timer": "thread_time", "load_average": round(os.getloadavg()[0], 2),
            "baseline": "the same SA without source authentication (mode none), same run",
            "ratio_note": "ratio_to_none = min(seal_ratio, open_ratio)", "results": results}


def render(result: dict[str, Any]) -> str:
    lines = [f"source authentication, {result['suite']}, medians of {result['rounds']} rounds, thread CPU time, "
             f"load average {result.get('load_average', '?')} "
             f"(ratios vs mode none in the same run; target for sign-batched >= {result['target']})",
             f"{'mode':<13} {'window':>6} {'size':>5} {'+bytes':>6} {'seal pps':>10} {'open pps':>10} "
             f"{'seal ratio':>10} {'open ratio':>10}"]
    for r in result["results"]:
        lines.append(f"{r['mode']:<13} {r['window'] or '-':>6} {r['size']:>5} {r['overhead_bytes']:>6} "
                     f"{r['seal_pps']:>10} {r['open_pps']:>10} {r['seal_ratio']:>10.3f} {r['open_ratio']:>10.3f}")
    return "\n".join(lines)
