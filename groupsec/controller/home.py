"""The controller home directory (``groupsec init DIR``) and the admin-socket client used by
the CLI to poke a running ``groupsec serve``."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Any

from groupsec.controller.config import Config, load_config
from groupsec.controller.server import ADMIN_SOCK
from groupsec.controller.store import SQLiteStore
from groupsec.errors import ConfigError
from groupsec.protocol.framing import FrameDecoder, encode_frame
from groupsec.protocol.messages import pack, unpack_untrusted

CONFIG = "groupsec.toml"


def add_home_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--dir", default=os.environ.get("GROUPSEC_HOME", "."), metavar="DIR",
                   help="controller home made by `groupsec init` (default: $GROUPSEC_HOME or .)")


def home_of(args: argparse.Namespace) -> Path:
    home = Path(args.dir)
    if not (home / CONFIG).exists() and not (home / "ca.key").exists():
        raise ConfigError(f"{home}: not a controller home (run `groupsec init {home}` first)")
    return home


def config_of(home: Path) -> Config:
    return load_config(home / CONFIG)


def store_of(home: Path, config: Config) -> Any:
    if config.controller.state.startswith("etcd://"):  # HA: state in etcd, sealed with DIR/store.key
        from groupsec.controller.ha import open_etcd_store

        return open_etcd_store(home, config.controller.state)
    p = Path(config.controller.state)
    return SQLiteStore(p if p.is_absolute() else home / p)


def admin_request(home: Path, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any] | None:
    """Send one request to a running server; None when no server listens on DIR/admin.sock."""
    path = home / ADMIN_SOCK
    if not path.exists():
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        s.close()
        return None
    with s:
        s.sendall(encode_frame(pack(req)))
        dec = FrameDecoder()
        while (frame := dec.next_frame()) is None:
            data = s.recv(65536)
            if not data:
                raise ConfigError(f"{path}: the server closed the admin connection")
            dec.feed(data)
    reply = unpack_untrusted(frame)
    if not isinstance(reply, dict):
        raise ConfigError(f"{path}: bad admin reply")
    return reply
