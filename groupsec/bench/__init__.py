"""``groupsec bench KIND``: benchmarks that report a ratio against a baseline measured in
the same run (these machines are noisy, so a ratio is the figure that holds).

Each benchmark is a module ``groupsec.bench.<kind>`` with ``add_arguments(parser)`` and
``run(args) -> dict`` (the JSON object) and ``render(result) -> str`` (the table).
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

BENCHES = {
    "packet": "ESP/AH seal and open vs the bare cryptography call",
    "register": "controller registrations per second over TLS 1.3 from client processes",
    "datapath": "protected vs plaintext relay over loopback multicast",
    "sourceauth": "per-packet and batched Ed25519 source authentication vs the same SA without it",
    "evict": "LKH eviction rekey size and compute time vs per-member wrapping",
    "rekey": "time from `groupsec rekey` until every agent has installed the new SAs",
    "failover": "HA: kill the leader of 3 controllers (real etcd) under 1,000 pps: failover time, loss, KEK splits",
}


def register_commands(sub: Any) -> None:
    # Not named ``register``: importing the ``groupsec.bench.register`` benchmark would
    # replace a package attribute of that name.
    p = sub.add_parser("bench", help="run a benchmark (ratios against a same-run baseline)",
                       description="Run a benchmark. Prints a table, or one JSON object with --json.")
    bsub = p.add_subparsers(dest="bench", metavar="KIND")
    bsub.required = True
    for kind, helptext in BENCHES.items():
        modname = f"groupsec.bench.{kind.replace('-', '_')}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            continue  # a benchmark registered before its module landed: leave it out of the CLI
        bp = bsub.add_parser(kind, help=helptext, description=helptext)
        bp.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        mod.add_arguments(bp)
        bp.set_defaults(func=_runner(mod))


def _runner(mod: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        result = mod.run(args)
        print(json.dumps(result) if args.json else mod.render(result))
        return 0

    return run
