"""``groupsec bench evict``: the size and compute time of an LKH eviction rekey, against
wrapping a new KEK once for every remaining member (the flat scheme of the rekey issue).

For each group size N the tree is bulk-built (not timed), then the member with the deepest
leaf (the costliest eviction) is evicted, ``--evictions`` times in a row. Each eviction is
measured the way the controller really sends it: ``LKHTree.evict`` + encoding + the rekey
datagrams of :mod:`groupsec.protocol.rekey` (header with group, level, message ID and KEK
epoch, AES-256-GCM under the current KEK, one Ed25519 signature per datagram, split at
``--mtu``). ``bytes`` is the total size of those datagrams (the worst of the evictions),
``ms`` the median compute time. ``baseline_bytes`` is the same framing around one new KEK
wrapped (same AES-KW wrap, same message encoding) under every remaining member's own key.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.keys.lkh import DEFAULT_DEGREE, ROOT_ID, LKHTree, RekeyMessage, Wrap
from groupsec.keys.wrap import new_key, wrap_key
from groupsec.protocol.rekey import MAX_FRAGMENTS, build_rekey_datagrams

DEFAULT_MEMBERS = (100, 1000, 10000, 100000)
GROUP, LEVEL = "iot-fleet", "default"
MSG_ID = 1_000_000  # a mature group's message counter (a 4-byte msgpack integer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--members", nargs="+", default=None, metavar="N",
                        help="group sizes (default 100 1000 10000 100000; commas also work)")
    parser.add_argument("--degree", type=int, default=DEFAULT_DEGREE, help=f"tree degree d (default {DEFAULT_DEGREE})")
    parser.add_argument("--evictions", type=int, default=5, help="single evictions measured per size (default 5)")
    parser.add_argument("--mtu", type=int, default=1200, help="rekey datagram size limit (default 1200)")


def _sizes(raw: list[str] | None) -> list[int]:
    if not raw:
        return list(DEFAULT_MEMBERS)
    return [int(x) for item in raw for x in item.split(",") if x]


def _frame(signer: Ed25519PrivateKey, kek_epoch: int, kek: bytes, payload: bytes, mtu: int,
           new_epoch: int | None = None) -> list[bytes]:
    # the controller's payload: the tree message and the KEK epoch of the new root (keytree.lkh_inner)
    inner = {"lkh": payload, "lkh_kek_epoch": kek_epoch + 1 if new_epoch is None else new_epoch}
    return build_rekey_datagrams(signer, kek_epoch, kek, GROUP, LEVEL, MSG_ID, "lkh", inner, 1.7e9, mtu=mtu)


def _baseline_bytes(tree: LKHTree, signer: Ed25519PrivateKey, mtu: int) -> int:
    """One new KEK wrapped under each member's own (leaf) key, in as many messages as the
    datagram format allows (it caps a message at MAX_FRAGMENTS datagrams)."""
    epoch, kek = tree.epoch + 1, new_key()
    wraps = []
    for member in tree.members():
        leaf = tree.path_for(member).keys[0]
        wraps.append(Wrap(ROOT_ID, epoch, leaf.node_id, leaf.version,
                          wrap_key(leaf.key, kek, ROOT_ID, epoch, leaf.node_id, leaf.version)))
    per_message = max(1, (MAX_FRAGMENTS - 1) * (mtu - 300) // 50)
    total = 0
    for i in range(0, len(wraps), per_message):
        payload = RekeyMessage(epoch, tuple(wraps[i:i + per_message])).encode()
        total += sum(len(d) for d in _frame(signer, tree.kek_version, tree.kek, payload, mtu))
    return total


def measure(n: int, degree: int, evictions: int, mtu: int, signer: Ed25519PrivateKey) -> dict[str, Any]:
    tree = LKHTree.bulk((f"m{i}" for i in range(n)), degree)
    baseline = _baseline_bytes(tree, signer, mtu)
    sizes, wraps, times = [], [], []
    for _ in range(max(1, min(evictions, n - 1))):
        victim = tree.deepest_member()
        assert victim is not None
        kek_epoch, kek = tree.kek_version, tree.kek
        t0 = time.perf_counter()
        msg = tree.evict([victim])
        datagrams = _frame(signer, kek_epoch, kek, msg.encode(), mtu, tree.kek_version)
        times.append((time.perf_counter() - t0) * 1e3)
        sizes.append(sum(len(d) for d in datagrams))
        wraps.append(len(msg.wraps))
    return {"members": n, "bytes": max(sizes), "wraps": max(wraps), "ms": round(statistics.median(times), 3),
            "baseline_bytes": baseline}


def run(args: argparse.Namespace) -> dict[str, Any]:
    signer = Ed25519PrivateKey.generate()
    results = [measure(n, args.degree, args.evictions, args.mtu, signer) for n in _sizes(args.members)]
    return {"bench": "evict", "results": results}


def render(result: dict[str, Any]) -> str:
    rows = [f"{'members':>9} {'wraps':>6} {'bytes':>7} {'baseline bytes':>15} {'ratio':>8} {'ms':>8}"]
    for r in result["results"]:
        ratio = r["baseline_bytes"] / r["bytes"] if r["bytes"] else 0.0
        rows.append(f"{r['members']:>9} {r['wraps']:>6} {r['bytes']:>7} {r['baseline_bytes']:>15} "
                    f"{ratio:>7.0f}x {r['ms']:>8.2f}")
    rows.append("bytes: one eviction (deepest member) as signed rekey datagrams; ratio: baseline / LKH")
    return "\n".join(rows)
