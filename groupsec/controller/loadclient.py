"""A small registration client for tests and ``groupsec bench register`` (groupsec/ must
not import agent/). It speaks the member side of the control protocol just far enough to
register and optionally stay connected.

    python -m groupsec.controller.loadclient --port P --ca CA --creds FILE --concurrency 200
reads a credentials file (msgpack list of [name, key_pem, cert_pem]) and prints one JSON
line: {"ok": n, "failures": n, "latencies_ms": [...], "errors": {code: n}}.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import trio

from groupsec.controller import pki
from groupsec.controller.store import Store
from groupsec.protocol.framing import FrameDecoder, encode_frame
from groupsec.protocol.messages import PROTOCOL_VERSION, Error, Message, Register, decode_message_untrusted


def client_context(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None,
                   minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
                   maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    ctx.load_verify_locations(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


@dataclass
class Conn:
    stream: trio.SSLStream[Any]
    dec: FrameDecoder

    async def send(self, msg: Message) -> None:
        await self.stream.send_all(encode_frame(msg.encode()))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> Message | None:
        while (frame := self.dec.next_frame()) is None:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self.dec.feed(data)
        return decode_message_untrusted(frame)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def connect(host: str, port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> Conn:
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_hostname)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return Conn(stream, FrameDecoder())


async def register(host: str, port: int, ctx: ssl.SSLContext, groups: list[dict[str, str]],
                   keep: bool = False) -> tuple[Message | None, Conn | None]:
    conn = await connect(host, port, ctx)
    try:
        await conn.send(Register(PROTOCOL_VERSION, groups))
        reply = await conn.recv()
    except BaseException:
        await conn.aclose()
        raise
    if not keep:
        await conn.aclose()
        return reply, None
    return reply, conn


def enrol_many(home: Path, store: Store, prefix: str, n: int, groups: list[list[str]], out: Path) -> Path:
    """Issue ``n`` member certificates and registry entries (one transaction); write them to
    ``out`` as a msgpack list of [name, key_pem, cert_pem]. For tests and benchmarks."""
    ca = pki.CA.load(home)
    creds = []
    puts = {}
    for i in range(n):
        name = f"{prefix}{i}"
        key = pki.new_member_key()
        cert = ca.issue(name, key.public_key())
        creds.append([name, pki.key_pem(key), pki.cert_pem(cert)])
        puts[f"member/{name}"] = {"name": name, "groups": groups, "revoked": False, "evicted": False,
                                  "serials": [format(cert.serial_number, "X")], "datapath": "any",
                                  "created": time.time()}
    store.commit(puts)
    pki.write_secret(out, msgpack.packb(creds, use_bin_type=True))
    return out


def contexts_from(creds_file: Path, ca: Path) -> list[tuple[str, ssl.SSLContext]]:
    creds = msgpack.unpackb(creds_file.read_bytes(), raw=False)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, key_pem, cert_pem in creds:
            p = Path(tmp) / "c.pem"
            p.write_bytes(key_pem + cert_pem)
            out.append((name, client_context(ca, p)))
    return out


async def run_many(host: str, port: int, contexts: list[tuple[str, ssl.SSLContext]], groups: list[dict[str, str]],
                   concurrency: int, start_at: float | None = None) -> dict[str, Any]:
    lat: list[float] = []
    errors: dict[str, int] = {}
    sem = trio.Semaphore(concurrency)
    if start_at is not None:
        await trio.sleep(max(0.0, start_at - time.time()))

    async def one(ctx: ssl.SSLContext) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                with trio.fail_after(60):
                    reply, _ = await register(host, port, ctx, groups)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            if reply is not None and reply.TYPE == "registered":
                lat.append((time.perf_counter() - t0) * 1000)
            else:
                code = reply.code if isinstance(reply, Error) else "no-reply"
                errors[code] = errors.get(code, 0) + 1

    async with trio.open_nursery() as nursery:
        for _, ctx in contexts:
            nursery.start_soon(one, ctx)
    return {"ok": len(lat), "failures": sum(errors.values()), "latencies_ms": lat, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="groupsec.controller.loadclient")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--creds", required=True)
    ap.add_argument("--group", action="append", required=True, metavar="G:ROLE[:LEVEL]")
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--start-at", type=float, help="wall-clock time to start (synchronise processes)")
    ap.add_argument("--wait-stdin", action="store_true", help="print 'ready' on stderr, start on a line on stdin")
    args = ap.parse_args(argv)
    contexts = contexts_from(Path(args.creds), Path(args.ca))
    groups = []
    for spec in args.group:
        g, role, *lv = spec.split(":")
        groups.append({"group": g, "role": role, "level": lv[0] if lv else ""})
    print("ready", file=sys.stderr, flush=True)
    if args.wait_stdin:
        sys.stdin.readline()
    res = trio.run(run_many, args.host, args.port, contexts, groups, args.concurrency, args.start_at)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
