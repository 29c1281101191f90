"""``groupsec serve``, ``groupsec status`` and ``groupsec rekey GROUP``."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from groupsec.controller import pki
from groupsec.controller.app import ControllerApp
from groupsec.controller.home import add_home_argument, admin_request, config_of, home_of, store_of
from groupsec.controller.rekey import RekeyScheduler
from groupsec.controller.server import ControllerServer, server_ssl_context
from groupsec.errors import ConfigError
from groupsec.logs import add_log_format_argument, setup_logging
from groupsec.metrics import ControllerCollector, add_metrics_arguments, make_registry, serve_metrics


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the group controller (TLS 1.3 registration, rekeys, zeroconf)",
                       description="Run the group controller from a home made by `groupsec init`.")
    add_home_argument(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="override controller.listen (port 0: any free port)")
    p.add_argument("--no-advertise", action="store_true", help="do not advertise over zeroconf")
    p.add_argument("--port-file", metavar="FILE", help="write the listening port here once listening")
    p.add_argument("--store", metavar="URL", help="etcd://HOST:PORT[,HOST:PORT...]: several controllers share "
                   "one etcd cluster, one of them the elected leader (default: controller.state, SQLite)")
    p.add_argument("--store-key", action="append", metavar="FILE", help="key file sealing every value in etcd "
                   "(0600; default $GROUPSEC_STORE_KEY or DIR/store.key; repeat: first seals, all open)")
    p.add_argument("--name", help="this controller's name in the cluster (default: its certificate's CN)")
    p.add_argument("--lease-ttl", type=int, default=5, metavar="S", help="leader lease TTL in seconds (default 5)")
    p.add_argument("-v", "--verbose", action="store_true")
    add_log_format_argument(p)
    add_metrics_arguments(p)
    p.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="groups, epochs and each member's last acknowledgement")
    add_home_argument(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("rekey", help="roll a group's TEKs over now (on a running controller)")
    r.add_argument("group")
    r.add_argument("--level", help="only this level (default: every level of the group)")
    r.add_argument("--kek", action="store_true", help="also roll the KEK over")
    add_home_argument(r)
    r.set_defaults(func=cmd_rekey)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cmd_serve(args: argparse.Namespace) -> int:
    home = home_of(args)
    config = config_of(home)
    setup_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    host, port = config.controller.listen_host, config.controller.listen_port
    if args.listen:
        h, _, p = args.listen.rpartition(":")
        if not p.isdigit():
            raise ConfigError(f"--listen {args.listen!r}: expected HOST:PORT")
        host, port = h.strip("[]") or "0.0.0.0", int(p)
    ctx = server_ssl_context(home)
    ca_cert = _ca_cert(home)  # the CA's private key stays off controller hosts (HA homes have none)
    url = args.store or (config.controller.state if config.controller.state.startswith("etcd://") else None)
    ha = None
    if url:
        from groupsec.controller.ha import HAControl

        if not url.startswith("etcd://"):
            raise ConfigError(f"--store {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
        name = args.name or _cert_cn(home)
        ha = HAControl.open(home, url, args.store_key, name, args.lease_ttl)
        store = ha.store
    else:
        store = store_of(home, config)
    app = ControllerApp(config, store, pki.load_rekey_key(home), home)
    _raise_nofile()
    server = ControllerServer(app, ctx, home)
    if ha is not None:
        ha.attach(app, server)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server.app.multicast = server._send_multicast
            if ha is None:
                app.start()
            ports = await nursery.start(server.serve, host, port)
            if ha is not None:  # the elected leader starts the app (state from etcd)
                ha.addr = f"{host}:{ports[0]}"
                await nursery.start(ha.run)
            await nursery.start(RekeyScheduler(app).run)
            if args.metrics_port is not None:
                registry = make_registry(ControllerCollector(app, server))
                await nursery.start(serve_metrics, registry, args.metrics_addr, args.metrics_port)
            if args.port_file:
                _write_port(args.port_file, ports[0])
            if config.controller.advertise and not args.no_advertise:
                from groupsec.controller.discovery import advertise

                nursery.start_soon(advertise, ports[0], pki.fingerprint(ca_cert))
            if args.log_format == "text":  # JSON logs: stderr carries JSON lines only (server.py logs this)
                print(f"groupsec serve: listening on {host} port {ports[0]}", file=sys.stderr, flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logging.getLogger("groupsec.controller").info("stopping on %s", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        app.flush_acks()
        store.close()
    return 0


def _ca_cert(home: Path) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate((home / pki.CA_CERT).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{home / pki.CA_CERT}: missing (run `groupsec init {home}` first)") from None


def _cert_cn(home: Path) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate((home / pki.CTL_CERT).read_bytes())
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else "controller"


def _write_port(path: str, port: int) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)  # atomic: a reader never sees an empty file


def cmd_status(args: argparse.Namespace) -> int:
    home = home_of(args)
    reply = admin_request(home, {"op": "status"})
    running = reply is not None
    if reply is None:
        config = config_of(home)
        app = ControllerApp(config, store_of(home, config), pki.load_rekey_key(home), home)
        status = app.status()
    else:
        if not reply.get("ok"):
            raise ConfigError(f"status: {reply.get('error')}")
        status = reply["status"]
    status["running"] = running
    if args.json:
        print(json.dumps(status))
        return 0
    from groupsec.controller.status_view import print_status

    print_status(status)
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    home = home_of(args)
    config = config_of(home)
    if not config.group_levels(args.group):
        raise ConfigError(f"{args.group}: unknown group (configured: {', '.join(config.groups)})")
    reply = admin_request(home, {"op": "rekey", "group": args.group, "level": args.level, "kek": args.kek})
    if reply is None:
        raise ConfigError(f"no controller is running in {home} (start `groupsec serve -d {home}`)")
    if not reply.get("ok"):
        raise ConfigError(f"rekey {args.group}: {reply.get('error')}")
    if reply.get("forwarded"):
        print(f"forwarded to the leader ({reply['forwarded']}): request {reply.get('request')}")
    for r in reply["rekeyed"]:
        print(f"rekeyed {r['group']}/{r['level'] or '-'}: message ID {r['msg_id']}")
    return 0
