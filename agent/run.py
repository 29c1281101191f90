"""``groupsec-agent run``: join groups and protect their traffic until stopped.

    groupsec-agent run --config agent.toml
    groupsec-agent run --bundle DIR --controller HOST:PORT --group video:sender \\
        --relay video=127.0.0.1:6000,127.0.0.1:6001 --state-dir /tmp/agent1

The running agent writes ``STATE_DIR/status.json`` (0644, no key material) every
``session.status_interval`` seconds and on every change; ``groupsec-agent status`` reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from agent.config import AgentConfig, Bundle, load, load_bundle, parse_group_flag, parse_relay_flag
from groupsec.errors import ConfigError
from groupsec.logs import add_log_format_argument, setup_logging
from groupsec.metrics import add_metrics_arguments

log = logging.getLogger("groupsec.agent")
STATUS_FILE = "status.json"


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="register with the controller and protect the groups' traffic",
                       description="Run the member agent (settings from --config, flags win).")
    p.add_argument("--config", metavar="FILE", help="agent.toml (see docs/AGENT.md)")
    p.add_argument("--bundle", metavar="PATH", help="credential bundle from `groupsec member add --out`")
    p.add_argument("--controller", metavar="HOST:PORT", help='controller address, or "discover" (zeroconf)')
    p.add_argument("--group", action="append", metavar="G:ROLE[:LEVEL]", default=[],
                   help="a group to join, role sender or receiver (repeat; replaces the file's groups)")
    p.add_argument("--datapath", choices=("userspace", "xfrm"))
    p.add_argument("--relay", action="append", metavar="G=LISTEN,DELIVER[,GPORT]", default=[],
                   help="local plaintext relay for group G: apps send to LISTEN, decrypted payloads go to "
                        "DELIVER (host:port or port, '-' for none); GPORT: inner destination port")
    p.add_argument("--interface", metavar="IFACE", help="wire interface (name or address; default loopback)")
    p.add_argument("--wire", choices=("auto", "encap", "raw"), help="ESP-in-UDP or raw ESP/AH (auto: policy)")
    p.add_argument("--ttl", type=int, help="multicast TTL on the wire")
    p.add_argument("--tun", metavar="NAME", help="TUN mode: create this device and route the groups into it")
    p.add_argument("--state-dir", metavar="DIR", help="where status.json is written")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    add_log_format_argument(p)
    add_metrics_arguments(p)
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    over: dict[str, Any] = {"bundle": args.bundle, "controller": args.controller, "datapath": args.datapath,
                            "interface": args.interface, "wire": args.wire, "ttl": args.ttl,
                            "state_dir": args.state_dir, "log_level": args.log_level}
    if args.tun:
        over["tun"] = {"name": args.tun}
    base: dict[str, Any] = {}
    if args.config:
        from agent.config import load_toml

        base = load_toml(args.config)
    groups: list[dict[str, Any]] = [dict(g) for g in base.get("group", [])] if isinstance(base.get("group"), list) else []
    if args.group:
        groups = []
        for text in args.group:
            g = parse_group_flag(text)
            groups.append({"name": g.group, "role": g.role, "level": g.level})
    for text in args.relay:
        name, listen, deliver, gport = parse_relay_flag(text)
        match = [g for g in groups if (f"{g.get('name')}/{g['level']}" if g.get("level") else g.get("name")) == name]
        if not match:
            raise ConfigError(f"--relay {text!r}: group {name!r} is not one of the joined groups")
        for g in match:
            g["relay_listen"] = f"{listen[0]}:{listen[1]}" if listen else None
            g["relay_deliver"] = f"{deliver[0]}:{deliver[1]}" if deliver else None
            if gport is not None:
                g["relay_group_port"] = gport
            for k in ("relay_listen", "relay_deliver"):
                if g[k] is None:
                    del g[k]
    if groups or args.group:
        over["group"] = groups
    if args.config is None and over.get("state_dir") is None:
        over["state_dir"] = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/run", "groupsec-agent")
    return load(args.config, over)


def make_datapath(cfg: AgentConfig) -> Any:
    if cfg.datapath == "xfrm":
        from agent.datapath import sockets as so
        from agent.datapath.xfrm import XfrmDatapath

        iface = so.resolve_interface(cfg.interface) if cfg.interface else None
        return XfrmDatapath(interface=iface)
    from agent.datapath.relay import RelayConfig
    from agent.datapath.userspace import TunConfig, UserspaceConfig, UserspaceDatapath

    relays = {g.name: RelayConfig(listen=g.relay_listen, deliver=g.relay_deliver, group_port=g.relay_group_port)
              for g in cfg.groups if g.has_relay}
    tun = None
    if cfg.tun is not None:
        tun = TunConfig(cfg.tun.name, cfg.tun.mtu, frozenset(cfg.tun.groups) if cfg.tun.groups is not None else None)
    return UserspaceDatapath(UserspaceConfig(interface=cfg.interface, ttl=cfg.ttl, loop=cfg.loop, wire=cfg.wire,  # type: ignore[arg-type]
                                             relays=relays, tun=tun))


def write_status(state_dir: Path, session: Any, datapath: Any, started: float) -> None:
    """Atomically replace STATE_DIR/status.json (no keys: SPIs, counters, epochs only)."""
    st = session.statistics()
    try:
        dps = datapath.statistics()
    except Exception as exc:  # a data path bug must not stop the status file
        dps = {"error": f"{type(exc).__name__}: {exc}"}
    doc = {"pid": os.getpid(), "written": time.time(), "started": started, "agent": st, "datapath": dps}
    tmp = state_dir / f".{STATUS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(doc, default=str, indent=1))
    os.chmod(tmp, 0o644)
    os.replace(tmp, state_dir / STATUS_FILE)


async def serve(cfg: AgentConfig, bundle: Bundle, *, metrics: tuple[str, int] | None = None,
                task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """``metrics``: (addr, port) of a Prometheus exporter to run alongside (agent/metrics.py)."""
    from agent.session import AgentSession

    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    datapath = make_datapath(cfg)
    started = time.time()
    try:
        if hasattr(datapath, "reconcile"):  # XFRM: remove stale SAs/policies of ours (a killed earlier run)
            datapath.reconcile()
        session = AgentSession(cfg, bundle, datapath)
        async with trio.open_nursery() as n:
            if hasattr(datapath, "run"):
                await n.start(datapath.run)
            n.start_soon(session.run)
            n.start_soon(_status_loop, cfg, session, datapath, started)
            if metrics is not None:
                from agent.metrics import agent_registry
                from groupsec.metrics import serve_metrics

                await n.start(serve_metrics, agent_registry(session, datapath), *metrics)
            task_status.started(session)
    finally:
        if hasattr(datapath, "close"):
            datapath.close()
        try:
            (cfg.state_dir / STATUS_FILE).unlink()
        except OSError:
            pass


async def _status_loop(cfg: AgentConfig, session: Any, datapath: Any, started: float) -> None:
    while True:
        try:
            write_status(cfg.state_dir, session, datapath, started)
        except OSError as exc:
            log.warning("cannot write %s: %s", cfg.state_dir / STATUS_FILE, exc)
        with trio.move_on_after(cfg.status_interval):
            await session.member_changed()


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    bundle = load_bundle(cfg.bundle)
    setup_logging(args.log_format, getattr(logging, cfg.log_level.upper()))
    log.info("member %s, %d group(s), data path %s, controller %s", bundle.name, len(cfg.groups), cfg.datapath,
             f"{cfg.controller[0]}:{cfg.controller[1]}" if cfg.controller else "discover")

    async def _main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async with trio.open_nursery() as n:
                metrics = (args.metrics_addr, args.metrics_port) if args.metrics_port is not None else None
                await n.start(partial(serve, cfg, bundle, metrics=metrics))

                async def stop() -> None:
                    async for _ in sigs:
                        log.info("stopping")
                        n.cancel_scope.cancel()
                        return

                n.start_soon(stop)

    try:
        trio.run(_main)
    except BaseExceptionGroup as eg:  # a ConfigError from inside a nursery: report it in one line
        first = _first_config_error(eg)
        if first is not None:
            raise first from None
        raise
    return 0


def _first_config_error(eg: BaseExceptionGroup) -> ConfigError | None:
    for exc in eg.exceptions:
        if isinstance(exc, ConfigError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_config_error(exc)) is not None:
            return found
    return None
