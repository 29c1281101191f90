"""Worker processes for ``groupsec bench datapath`` and the data path's process tests,
plus ``static_installs``: statically configured SAs for a group (no controller).

    python -m agent.datapath.bench recv   # bench receiver: wire -> relay -> sink app
    python -m agent.datapath.bench send   # bench sender: app generator -> relay -> wire
    python -m agent.datapath.bench agent  # a UserspaceDatapath with static SAs (e2e tests)

Each reads one JSON line from stdin (the spec: key material never goes on the command
line), prints one JSON line when it is ready and one with its result at the end.

The benchmark is fair by construction: both modes build exactly the same objects
(``EncapWire`` + ``Relay``, same sockets, same buffers, same process layout); the only
difference is the engine: ``GroupEngine`` (ESP-in-UDP, tunnel mode) or ``PlainEngine``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import trio

from agent.datapath import sockets as so
from agent.datapath.base import GroupInstall
from agent.datapath.engine import GroupEngine, PlainEngine
from agent.datapath.relay import Relay, RelayConfig
from agent.datapath.userspace import TunConfig, UserspaceConfig, UserspaceDatapath
from agent.datapath.wire import DEFAULT_RCVBUF, EncapWire
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.policy import GroupPolicy
from groupsec.ipsec.suites import get_suite

# --- static SAs ------------------------------------------------------------------------------


def drain_count(sock: Any, buf: bytearray) -> int:
    """Read a readable non-blocking socket dry into ``buf``; return how many datagrams it held."""
    n = 0
    while True:
        try:
            sock.recv_into(buf)
        except BlockingIOError:
            return n
        n += 1

def static_installs(dst: str, *, group: str = "static", port: int | None = 5004, encap_port: int | None = 4500,
                    suite: str = "aes-gcm-16-128", mode: str = "tunnel", protocol: str = "esp",
                    spi: int | None = None, enc_key: bytes | None = None, auth_key: bytes | None = None,
                    src: str | None = None) -> tuple[GroupInstall, GroupInstall]:
    """One group SA shared by the group: (sender's install, receive-only member's install).
    Fresh random keys and SPI unless given."""
    s = get_suite(suite, protocol)  # type: ignore[arg-type]
    if spi is None:
        spi = int.from_bytes(os.urandom(4), "big") | 0x1000
    enc_key = enc_key if enc_key is not None else os.urandom(s.enc_key_len)
    auth_key = auth_key if auth_key is not None else os.urandom(s.auth_key_len)
    pol = GroupPolicy(group=group, dst=dst, protocol=protocol, suite=suite, mode=mode,  # type: ignore[arg-type]
                      port=port, udp_encap_port=encap_port, src=src)
    sa = SAParams(spi=spi, protocol=protocol, suite=suite, mode=mode, dst=dst,  # type: ignore[arg-type]
                  enc_key=enc_key, auth_key=auth_key, src=src, udp_encap_port=encap_port, group=group)
    return GroupInstall(pol, inbound=(sa,), outbound=sa), GroupInstall(pol, inbound=(sa,), outbound=None)


def _sa_to_json(p: SAParams) -> dict[str, Any]:
    d = p.to_dict()
    d["enc_key"], d["auth_key"] = p.enc_key.hex(), p.auth_key.hex()
    return d


def _sa_from_json(d: dict[str, Any]) -> SAParams:
    return SAParams.from_dict({**d, "enc_key": bytes.fromhex(d["enc_key"]), "auth_key": bytes.fromhex(d["auth_key"])})


def install_to_json(inst: GroupInstall) -> dict[str, Any]:
    """Contains key material: pass it on stdin, never on a command line or in a log."""
    return {"policy": inst.policy.to_dict(), "inbound": [_sa_to_json(p) for p in inst.inbound],
            "outbound": _sa_to_json(inst.outbound) if inst.outbound is not None else None}


def install_from_json(d: dict[str, Any]) -> GroupInstall:
    return GroupInstall(GroupPolicy.from_dict(d["policy"]), tuple(_sa_from_json(x) for x in d["inbound"]),
                        _sa_from_json(d["outbound"]) if d["outbound"] is not None else None)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _read_spec() -> dict[str, Any]:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("no spec on stdin")
    return json.loads(line)  # type: ignore[no-any-return]


# --- the benchmark's two halves ---------------------------------------------------------------


def _bench_pipeline(spec: dict[str, Any], relay: RelayConfig) -> tuple[GroupEngine | PlainEngine, EncapWire, Relay]:
    inst = install_from_json(spec["install"])
    iface = so.resolve_interface(spec.get("interface"))
    if spec["mode"] == "protected":
        engine: GroupEngine | PlainEngine = GroupEngine(inst, "encap", iface.address, time.monotonic())
    else:
        engine = PlainEngine(inst.policy, iface.address)
    assert inst.policy.udp_encap_port is not None
    # the data path's own default socket buffers: the figures are those of a default agent
    wire = EncapWire(engine, iface, inst.policy.udp_encap_port, ttl=1, loop=True)
    r = Relay(engine, relay, wire.send)
    wire.deliver = r.deliver
    return engine, wire, r


async def _bench_recv(spec: dict[str, Any]) -> None:
    sink = so.open_udp(("127.0.0.1", 0), rcvbuf=DEFAULT_RCVBUF)
    engine, wire, relay = _bench_pipeline(spec, RelayConfig(listen=None, deliver=sink.getsockname()[:2]))
    count = 0
    first = last = cpu0 = cpu1 = 0.0
    idle = float(spec.get("idle", 1.0))
    buf = bytearray(65536)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wire.receive_loop)
        _emit({"ready": True})
        deadline = time.monotonic() + float(spec.get("timeout", 60.0))
        while True:
            with trio.move_on_after(idle if count else deadline - time.monotonic()) as cs:
                await trio.lowlevel.wait_readable(sink)
            if cs.cancelled_caught:
                break
            if not count:
                cpu0 = time.process_time()
            count += drain_count(sink, buf)
            last = time.monotonic()
            cpu1 = time.process_time()
            if not first:
                first = last
        nursery.cancel_scope.cancel()
    st = engine.statistics()
    _emit({"delivered": count, "seconds": last - first, "cpu_seconds": cpu1 - cpu0, "rx_datagrams": wire.rx_datagrams,
           "relay_delivered": relay.delivered, "drops": st["drops"], "wire_drops": wire.drops,
           "relay_drops": relay.drops, "sas": st["sas"]})


async def _bench_send(spec: dict[str, Any]) -> None:
    _engine, wire, relay = _bench_pipeline(spec, RelayConfig(listen=("127.0.0.1", 0), deliver=None,
                                                            group_port=spec.get("group_port", 5004)))
    app = so.open_udp(("127.0.0.1", 0), sndbuf=1 << 20)
    addr = relay.listen_address
    assert addr is not None
    app.connect(addr)
    payload = os.urandom(int(spec["size"]))
    total, burst = int(spec["count"]), int(spec.get("burst", 32))
    rate = float(spec.get("rate") or 0)  # packets per second; 0: as fast as the relay takes them
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.send_loop)
        _emit({"ready": True})
        sys.stdin.readline()  # "go"
        start = time.monotonic()
        cpu0 = time.process_time()
        sent = 0
        while sent < total:
            n = min(burst, total - sent)
            for _ in range(n):
                try:
                    app.send(payload)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(app)
                    app.send(payload)
            sent += n
            if rate:
                await trio.sleep_until(start + sent / rate)
            else:
                await trio.lowlevel.checkpoint()  # the relay drains the burst
        while relay.app_in + sum(relay.drops.values()) < total and time.monotonic() - start < 60:  # noqa: ASYNC110
            await trio.sleep(0.001)
        seconds = time.monotonic() - start
        cpu = time.process_time() - cpu0
        nursery.cancel_scope.cancel()
    _emit({"app_sent": total, "relay_in": relay.app_in, "wire_sent": wire.tx_datagrams, "seconds": seconds,
           "cpu_seconds": cpu,
           "relay_drops": relay.drops, "wire_drops": wire.drops})


# --- a static-SA agent (for process and namespace tests) -----------------------------------------


def config_from_json(d: dict[str, Any]) -> UserspaceConfig:
    relays = {k: RelayConfig(listen=tuple(v["listen"]) if v.get("listen") else None,
                             deliver=tuple(v["deliver"]) if v.get("deliver") else None,
                             group_port=v.get("group_port")) for k, v in d.get("relays", {}).items()}
    tun = TunConfig(**d["tun"]) if d.get("tun") else None
    return UserspaceConfig(interface=d.get("interface"), ttl=d.get("ttl", 1), loop=d.get("loop"),
                           wire=d.get("wire", "auto"), relays=relays, tun=tun, guard=d.get("guard", True))


async def _agent(spec: dict[str, Any]) -> None:
    dp = UserspaceDatapath(config_from_json(spec.get("config", {})))
    installs = [install_from_json(x) for x in spec["installs"]]
    for inst in installs:
        dp.apply(inst)
    async with trio.open_nursery() as nursery:
        await nursery.start(dp.run)
        _emit({"ready": True, "relays": {f"{i.policy.group}": dp.relay_address(i.policy.key) for i in installs},
               "tun": dp.tun.name if dp.tun is not None else None})
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line or line.strip() == "quit":
                _emit(dp.statistics())  # the final figures, before the groups are torn down
                break
            if line.strip() == "stats":
                _emit(dp.statistics())
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.datapath.bench", description=__doc__.splitlines()[0])
    p.add_argument("role", choices=["send", "recv", "agent"])
    args = p.parse_args(argv)
    spec = _read_spec()
    fn = {"send": _bench_send, "recv": _bench_recv, "agent": _agent}[args.role]
    try:
        trio.run(fn, spec)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
