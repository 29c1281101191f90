"""``groupsec init DIR``: a new controller home (CA, controller cert, rekey key, config, state)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from groupsec.controller import pki
from groupsec.controller.config import EXAMPLE
from groupsec.controller.home import CONFIG
from groupsec.controller.store import SQLiteStore
from groupsec.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create a controller home: CA, TLS and rekey keys, example config",
                       description="Create a controller home DIR: a CA (ECDSA P-256), the controller's TLS "
                                   "certificate, an Ed25519 rekey-signing key, a commented groupsec.toml and an "
                                   "empty state database. Secret files are mode 0600.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP address for the controller certificate (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite an existing home (new CA: old members break)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    home = Path(args.dir)
    if (home / pki.CA_KEY).exists() and not args.force:
        raise ConfigError(f"{home}: already holds a CA (use --force to replace it)")
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    ca = pki.init_pki(home, args.host)
    cfg = home / CONFIG
    if not cfg.exists() or args.force:
        cfg.write_text(EXAMPLE)
        os.chmod(cfg, 0o600)
    SQLiteStore(home / "state.db").close()
    print(f"initialised {home}: CA fingerprint sha256:{pki.fingerprint(ca.cert)}")
    print(f"edit {cfg}, add members with `groupsec member add NAME --group G:receiver -d {home} --out BUNDLE`,"
          f" then run `groupsec serve -d {home}`")
    return 0
