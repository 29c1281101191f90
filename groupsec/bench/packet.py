"""``groupsec bench packet``: ESP seal and open against the bare ``cryptography`` call.

Mode "tunnel" seals an inner IPv4/UDP packet of ``size`` bytes with ``seal_esp`` (the ESP
core a tunnel-mode data path sends) and opens it with ``open_esp_untrusted``. The baseline is
the same payload through the bare primitive, measured in the same run, interleaved with ours:
``AESGCM``/``ChaCha20Poly1305`` ``encrypt``/``decrypt``, or for CBC a fresh AES-CBC context
plus a copy of the keyed HMAC (encrypt+MAC, verify+decrypt). Both opens go through the same
number of distinct packets (so both pay the same memory traffic). Each figure is the median of
``--repeats`` timings of ``--iterations`` calls; ratio = ns / baseline_ns.
"""

from __future__ import annotations

import argparse
import hmac as _hmac
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as c_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from groupsec.ipsec.ip import build_udp_packet
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.suites import get_suite

SUITES = ("aes-gcm-16-128", "chacha20-poly1305", "aes-cbc-128-hmac-sha-256")
SIZES = (64, 512, 1400)
TARGET = 1.3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iterations", type=int, default=20000, help="calls per timing (default 20000)")
    p.add_argument("--repeats", type=int, default=7, help="timings per figure; the median is reported (default 7)")


def _time(fn: Callable[..., Any], args_list: list[tuple[Any, ...]]) -> float:
    t0 = time.perf_counter_ns()
    for args in args_list:
        fn(*args)
    return (time.perf_counter_ns() - t0) / len(args_list)


def _baselines(suite: str, key: bytes, auth_key: bytes, payload: bytes, n: int
               ) -> tuple[Callable[..., Any], list[tuple[Any, ...]], Callable[..., Any], list[tuple[Any, ...]]]:
    """(seal function, its argument tuples, open function, its argument tuples)."""
    s = get_suite(suite)
    if s.kind == "aead":
        aead = ChaCha20Poly1305(key[:-4]) if suite.startswith("chacha") else AESGCM(key[:-4])
        nonce, aad = os.urandom(12), os.urandom(8)
        # open: n distinct ciphertexts, like the n distinct packets our open goes through
        opens = [(nonce[:4] + i.to_bytes(8, "big"), aad) for i in range(n)]
        open_args = [(nc, aead.encrypt(nc, payload, ad), ad) for nc, ad in opens]
        return aead.encrypt, [(nonce, payload, aad)] * n, aead.decrypt, open_args
    alg = algorithms.AES(key)
    mac = c_hmac.HMAC(auth_key, hashes.SHA256())
    padded = payload + bytes(-len(payload) % 16)
    iv = os.urandom(16)

    def seal(iv: bytes, data: bytes) -> bytes:
        enc = Cipher(alg, modes.CBC(iv)).encryptor()
        ct = enc.update(data) + enc.finalize()
        h = mac.copy()
        h.update(ct)
        return ct + h.finalize()[:16]

    open_args = [(iv, seal(iv, padded)) for iv in (os.urandom(16) for _ in range(n))]

    def open_(iv: bytes, data: bytes) -> bytes:
        h = mac.copy()
        h.update(data[:-16])
        if not _hmac.compare_digest(h.finalize()[:16], data[-16:]):
            raise ValueError("bad MAC")
        dec = Cipher(alg, modes.CBC(iv)).decryptor()
        return dec.update(data[:-16]) + dec.finalize()

    return seal, [(iv, padded)] * n, open_, open_args


def _one(suite: str, size: int, iterations: int, repeats: int) -> list[dict[str, Any]]:
    s = get_suite(suite)
    key, auth_key = os.urandom(s.enc_key_len), os.urandom(s.auth_key_len)
    params = SAParams(spi=0x4242, protocol="esp", suite=suite, mode="tunnel", dst="239.0.0.1", src="192.0.2.1",
                      enc_key=key, auth_key=auth_key, replay_window=4096)
    inner = build_udp_packet("192.0.2.1", "239.0.0.1", 5000, 5000, os.urandom(max(0, size - 28)))
    out = SecurityAssociation(params, "out", 0.0)
    sealed = [(out.seal_esp(4, inner, 0.0), 0.0) for _ in range(iterations)]
    b_seal, b_seal_args, b_open, b_open_args = _baselines(suite, key, auth_key, inner, iterations)
    seal_args = [(4, inner, 0.0)] * iterations
    ours_seal, base_seal, ours_open, base_open = [], [], [], []
    for _ in range(repeats):
        base_seal.append(_time(b_seal, b_seal_args))
        ours_seal.append(_time(SecurityAssociation(params, "out", 0.0).seal_esp, seal_args))
        base_open.append(_time(b_open, b_open_args))
        ours_open.append(_time(SecurityAssociation(params, "in", 0.0).open_esp_untrusted, sealed))
    rows = []
    for op, ours, base in (("seal", ours_seal, base_seal), ("open", ours_open, base_open)):
        ns, bns = statistics.median(ours), statistics.median(base)
        rows.append({"suite": suite, "mode": "tunnel", "size": size, "op": op, "ns": round(ns, 1),
                     "baseline_ns": round(bns, 1), "ratio": round(ns / bns, 3)})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    iterations = max(1, int(getattr(args, "iterations", 20000)))
    repeats = max(1, int(getattr(args, "repeats", 7)))
    results: list[dict[str, Any]] = []
    for suite in SUITES:
        for size in SIZES:
            results.extend(_one(suite, size, iterations, repeats))
    return {"bench": "packet", "results": results}


def render(result: dict[str, Any]) -> str:
    lines = [f"{'suite':<26} {'mode':<7} {'size':>5} {'op':<5} {'ns':>9} {'baseline':>9} {'ratio':>6}"]
    for r in result["results"]:
        flag = ""
        if r["suite"] == "aes-gcm-16-128" and r["size"] == 1400:
            verdict = "met" if r["ratio"] <= TARGET else "MISSED"
            flag = f"  (target <= {TARGET:.1f}: {verdict})"
        lines.append(f"{r['suite']:<26} {r['mode']:<7} {r['size']:>5} {r['op']:<5} {r['ns']:>9.1f} "
                     f"{r['baseline_ns']:>9.1f} {r['ratio']:>6.2f}{flag}")
    return "\n".join(lines)
