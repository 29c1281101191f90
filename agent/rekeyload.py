"""Many real agent sessions in one process, for ``groupsec bench rekey`` (which must not
import agent/, so it starts this module as a subprocess):

    python -m agent.rekeyload --port P --ca CA.crt --creds FILE --group G [--rekey-interface lo]

``FILE`` is a msgpack list of [name, key_pem, cert_pem] (``groupsec.controller.loadclient``).
Each member runs a full ``AgentSession`` (TLS 1.3 registration, rekey channel, Resync, acks)
with a recording data path instead of sockets. Prints ``ready`` on stderr once every session
registered, then one JSON line on stdout when every agent installed an SA it did not have at
registration (or at ``--timeout``): {"installed_at": [unix times], "missing": n}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import trio

from agent.config import AgentConfig, GroupSpec, load_bundle
from agent.datapath.base import GroupInstall
from agent.session import AgentSession


class RecordingDatapath:
    """Implements the Datapath protocol; remembers when a new SPI first appeared."""

    def __init__(self, done: trio.Event | None = None) -> None:
        self.first: set[int] | None = None
        self.installed_at: float | None = None
        self.on_new: Any = None

    def apply(self, install: GroupInstall) -> None:
        spis = {sa.spi for sa in install.inbound}
        if self.first is None:
            self.first = spis
        elif self.installed_at is None and spis - self.first:
            self.installed_at = time.time()
            if self.on_new is not None:
                self.on_new()

    def remove_group(self, key: tuple[str, str]) -> None:
        pass

    def statistics(self) -> dict[str, Any]:
        return {"installed_at": self.installed_at}


def build(args: argparse.Namespace, tmp: Path) -> list[tuple[AgentSession, RecordingDatapath]]:
    creds = msgpack.unpackb(Path(args.creds).read_bytes(), raw=False)
    ca = Path(args.ca).read_bytes()
    sessions = []
    for name, key_pem, cert_pem in creds:
        d = tmp / name
        d.mkdir()
        (d / "member.key").write_bytes(key_pem)
        (d / "member.key").chmod(0o600)
        (d / "member.crt").write_bytes(cert_pem)
        (d / "ca.crt").write_bytes(ca)
        cfg = AgentConfig(bundle=d, groups=(GroupSpec(args.group, "receiver"),), controller=("127.0.0.1", args.port),
                          interface=args.interface, state_dir=d, ack_jitter=args.ack_jitter, reconnect_min=0.5,
                          reconnect_max=5.0, handshake_timeout=60.0)
        dp = RecordingDatapath()
        sessions.append((AgentSession(cfg, load_bundle(d), dp), dp))
    return sessions


async def main_async(args: argparse.Namespace, sessions: list[tuple[AgentSession, RecordingDatapath]]
                     ) -> dict[str, Any]:
    done = trio.Event()
    remaining = [len(sessions)]

    def one_done() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            done.set()

    for _, dp in sessions:
        dp.on_new = one_done
    async with trio.open_nursery() as n:
        with trio.fail_after(args.timeout):
            for s, _ in sessions:
                n.start_soon(s.run)
            for s, _ in sessions:
                await s.registered.wait()
        print("ready", file=sys.stderr, flush=True)
        with trio.move_on_after(args.timeout):
            await done.wait()
        n.cancel_scope.cancel()
    times = [dp.installed_at for _, dp in sessions if dp.installed_at is not None]
    return {"installed_at": times, "missing": len(sessions) - len(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.rekeyload")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--creds", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--interface", default=None)
    ap.add_argument("--ack-jitter", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gs-rekeyload-") as tmp:
        sessions = build(args, Path(tmp))
        result = trio.run(main_async, args, sessions)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
