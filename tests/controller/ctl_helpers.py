"""Shared fixtures: a controller home with a two-level group and a few members."""

from __future__ import annotations

import time
from pathlib import Path

from groupsec.controller import pki
from groupsec.controller.store import SQLiteStore

CONFIG = """
[controller]
listen = "127.0.0.1:0"
handshake_timeout = 2.0
idle_timeout = 30.0
heartbeat_interval = 5.0
advertise = false

[groups.video]
dst = "239.1.1.1"
port = 5004
suite = "aes-gcm-16-128"
sender_id_bits = 8
rekey_channel = "239.1.1.255:17500"
tek_lifetime = 600
atd = 1.0
dtd = 2.0

[groups.tv]
dst = "ff3e::1234"
rekey_channel = "[ff3e::ffff]:17501"
[groups.tv.levels.hd]
port = 6000
suite = "aes-gcm-16-256"
[groups.tv.levels.sd]
port = 6002

[groups.plant]
dst = "239.2.2.2"
sender_policy = "per-sender"
rekey_channel = "239.2.2.255:17502"
datapath = "xfrm"
"""


def make_home(tmp: Path, config: str = CONFIG) -> Path:
    home = tmp / "home"
    home.mkdir()
    pki.init_pki(home, [])
    (home / "groupsec.toml").write_text(config)
    return home


def add_member(home: Path, name: str, groups: list[tuple[str, str, str]], *, days: int = 365,
               expired: bool = False, ca: pki.CA | None = None) -> tuple[Path, int]:
    """Issue a cert (optionally expired or from another CA) and write the registry record."""
    import datetime as dt

    ca = ca or pki.CA.load(home)
    key = pki.new_member_key()
    if expired:
        now = dt.datetime.now(dt.UTC)
        cert = ca.issue(name, key.public_key(), not_before=now - dt.timedelta(days=10),
                        not_after=now - dt.timedelta(days=1))
    else:
        cert = ca.issue(name, key.public_key(), days=days)
    p = home / f"{name}.pem"
    pki.write_secret(p, pki.key_pem(key) + pki.cert_pem(cert))
    store = SQLiteStore(home / "state.db")
    store.commit({f"member/{name}": {"name": name, "groups": [list(g) for g in groups], "revoked": False,
                                     "evicted": False, "serials": [format(cert.serial_number, "X")],
                                     "datapath": "any", "created": time.time()}})
    store.close()
    return p, cert.serial_number


