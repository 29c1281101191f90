"""``groupsec member add|sign|set|list|revoke``: the member registry and credentials.

The CLI writes the registry to the state store (one transaction) and then pokes a
running ``groupsec serve`` over DIR/admin.sock so the change acts at once (revocation
closes the member's sessions and rekeys the groups it belonged to)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from groupsec.controller import pki
from groupsec.controller.config import Config
from groupsec.controller.groups import GroupManager, parse_group_spec
from groupsec.controller.home import add_home_argument, admin_request, config_of, home_of, store_of
from groupsec.controller.store import Store
from groupsec.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("member", help="add, enrol, change, list and revoke members",
                       description="Manage the member registry and issue member credentials.")
    msub = p.add_subparsers(dest="member_cmd", metavar="ACTION")
    msub.required = True

    a = msub.add_parser("add", help="issue a credential bundle (key, certificate, CA, controller address)")
    a.add_argument("name")
    _group_args(a)
    a.add_argument("--out", required=True, metavar="BUNDLE",
                   help="bundle path: a single PEM file if it ends in .pem, else a directory")
    a.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    a.set_defaults(func=cmd_add)

    s = msub.add_parser("sign", help="enrol a member from its CSR (its private key never leaves it)")
    s.add_argument("csr", metavar="CSR")
    s.add_argument("--name", required=True)
    _group_args(s)
    s.add_argument("--out", required=True, metavar="CERT", help="where to write the signed certificate (PEM)")
    s.add_argument("--days", type=int, default=365)
    s.set_defaults(func=cmd_sign)

    u = msub.add_parser("set", help="change a member's groups, roles and levels (lost levels are rekeyed)")
    u.add_argument("name")
    _group_args(u)
    u.set_defaults(func=cmd_set)

    ls = msub.add_parser("list", help="list members")
    ls.add_argument("--json", action="store_true")
    add_home_argument(ls)
    ls.set_defaults(func=cmd_list)

    r = msub.add_parser("revoke", help="revoke members: refuse them, close their sessions, rekey their groups "
                        "(several names: one batch eviction, one key-tree rekey per level)")
    r.add_argument("name", nargs="+")
    add_home_argument(r)
    r.set_defaults(func=cmd_revoke)


def _group_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", action="append", required=True, metavar="G:ROLE[:LEVEL]",
                   help="authorize for group G as sender or receiver (optionally one level); repeatable")
    p.add_argument("--xfrm", action="store_true",
                   help="the member sends through Linux XFRM (refused for shared counter-mode SAs)")
    add_home_argument(p)


def _open(args: argparse.Namespace) -> tuple[Path, Config, Store]:
    home = home_of(args)
    config = config_of(home)
    return home, config, store_of(home, config)


def _record(args: argparse.Namespace, config: Config, store: Store, serial: int | None) -> dict[str, Any]:
    groups = [parse_group_spec(s) for s in args.group]
    GroupManager(config, store).check_member_groups(groups, args.xfrm)
    old = store.get(f"member/{args.name}")
    if old is not None and old.get("revoked"):
        raise ConfigError(f"member {args.name} is revoked; a revoked name is not reused")
    if old is not None and serial is not None:
        raise ConfigError(f"member {args.name} exists (use `groupsec member set` to change its groups)")
    return {"name": args.name, "groups": [list(g) for g in dict.fromkeys(groups)],
            "revoked": False, "evicted": False, "serials": (old or {}).get("serials", []) + (
                [format(serial, "X")] if serial is not None else []),
            "datapath": "xfrm" if args.xfrm else "any", "created": (old or {}).get("created", time.time())}


def _check_name(name: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_.@" for c in name):
        raise ConfigError(f"member name {name!r}: use 1-64 letters, digits, '-', '_', '.', '@'")


def _address_hint(config: Config) -> str:
    if config.controller.address_hint:
        return config.controller.address_hint
    host = config.controller.listen_host
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{config.controller.listen_port}"


def cmd_add(args: argparse.Namespace) -> int:
    _check_name(args.name)
    home, config, store = _open(args)
    ca = pki.CA.load(home)
    key = pki.new_member_key()
    cert = ca.issue(args.name, key.public_key(), days=args.days)
    rec = _record(args, config, store, cert.serial_number)
    out = Path(args.out)
    hint = _address_hint(config)
    fp = pki.fingerprint(ca.cert)
    if out.suffix == ".pem":
        header = f"# groupsec member bundle\n# name: {args.name}\n# controller: {hint}\n# ca-sha256: {fp}\n"
        pki.write_secret(out, header.encode() + pki.key_pem(key) + pki.cert_pem(cert) + pki.cert_pem(ca.cert))
    else:
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        pki.write_secret(out / "member.key", pki.key_pem(key))
        pki.write_public(out / "member.crt", pki.cert_pem(cert))
        pki.write_public(out / "ca.crt", pki.cert_pem(ca.cert))
        (out / "controller").write_text(f"{hint}\n")
        (out / "bundle.json").write_text(json.dumps({"name": args.name, "controller": hint, "ca_sha256": fp,
                                                     "key": "member.key", "cert": "member.crt", "ca": "ca.crt"},
                                                    indent=1) + "\n")
    store.commit({f"member/{args.name}": rec})
    admin_request(home, {"op": "reload", "name": args.name})
    print(f"member {args.name}: certificate serial {cert.serial_number:X}, bundle {out}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    _check_name(args.name)
    home, config, store = _open(args)
    ca = pki.CA.load(home)
    try:
        csr_pem = Path(args.csr).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{args.csr}: {exc.strerror}") from None
    cert = ca.sign_csr(csr_pem, args.name, days=args.days)
    rec = _record(args, config, store, cert.serial_number)
    pki.write_public(Path(args.out), pki.cert_pem(cert))
    store.commit({f"member/{args.name}": rec})
    admin_request(home, {"op": "reload", "name": args.name})
    print(f"member {args.name}: certificate serial {cert.serial_number:X} written to {args.out}")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    home, config, store = _open(args)
    old = store.get(f"member/{args.name}")
    if old is None:
        raise ConfigError(f"no member named {args.name}")
    rec = _record(args, config, store, None)
    lost = [list(k) for k in sorted(_levels(config, old) - _levels(config, rec))]
    store.commit({f"member/{args.name}": rec})
    reply = admin_request(home, {"op": "reload", "name": args.name, "lost": lost})
    print(f"member {args.name}: groups updated; levels left: {', '.join('/'.join(k) for k in lost) or 'none'}"
          + ("" if reply is None or not lost else " (rekeyed)"))
    return 0


def _levels(config: Config, rec: dict[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for g, _role, lv in rec.get("groups", []):
        for lc in config.group_levels(g):
            if lv in ("", lc.level) and (lc.members is None or rec["name"] in lc.members):
                out.add(lc.key)
    return out


def cmd_list(args: argparse.Namespace) -> int:
    _, _, store = _open(args)
    recs = [rec for _, rec in store.scan("member/")]
    if args.json:
        print(json.dumps([{k: rec.get(k) for k in ("name", "groups", "revoked", "serials", "datapath", "created")}
                          for rec in recs]))
        return 0
    print(f"{'NAME':<24} {'STATE':<8} {'DATAPATH':<8} GROUPS")
    for rec in recs:
        groups = " ".join(":".join(x for x in g if x) for g in rec.get("groups", []))
        print(f"{rec['name']:<24} {'revoked' if rec.get('revoked') else 'active':<8} {rec.get('datapath', 'any'):<8}"
              f" {groups}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    home, _, store = _open(args)
    names = list(dict.fromkeys(args.name))
    puts: dict[str, Any] = {}
    for name in names:
        rec = store.get(f"member/{name}")
        if rec is None:
            raise ConfigError(f"no member named {name}")
        rec["revoked"] = True
        rec["revoked_at"] = time.time()
        puts.update({f"member/{name}": rec, **{f"revoked/{s}": {"name": name} for s in rec.get("serials", [])}})
    store.commit(puts)
    who = ", ".join(names)
    req: dict[str, Any] = {"op": "revoke", "name": names[0]} if len(names) == 1 else {"op": "revoke", "names": names}
    reply = admin_request(home, req)
    if reply is None:
        print(f"member {who} revoked; no controller is running: it evicts {'it' if len(names) == 1 else 'them'} "
              "when it starts")
    elif reply.get("ok"):
        print(f"member {who} revoked and evicted: {reply.get('levels')} level(s) rekeyed")
    else:
        print(f"member {who} revoked; the running controller answered: {reply.get('error')}")
        return 1
    return 0


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())
