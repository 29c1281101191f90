"""The controller's configuration: ``DIR/groupsec.toml``, validated at start-up.

Every error is one line naming the file, the key and what is allowed, e.g.
``groupsec.toml: groups.video.suite: 'aes-ctr' is not one of aes-gcm-16-128, ...``.
The result is a list of ``LevelConfig``: one per group level (a group without
``levels`` has one level named ""), each able to build its ``GroupPolicy`` and SAs.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groupsec.errors import ConfigError, PolicyError
from groupsec.ipsec.params import MAX_REPLAY_WINDOW, MIN_REPLAY_WINDOW
from groupsec.ipsec.policy import GroupPolicy
from groupsec.ipsec.sourceauth import source_auth_refusal
from groupsec.ipsec.suites import AH_SUITES, ESP_SUITES, get_suite

IP_PROTOCOLS = {"any": None, "udp": 17, "tcp": 6, "icmp": 1, "icmpv6": 58, "sctp": 132}
DEFAULT_PORT = 7443

GROUP_KEYS = {
    "dst", "source", "protocol", "port", "protection", "suite", "mode", "tek_lifetime", "kek_lifetime", "atd",
    "dtd", "replay_window", "sender_policy", "sender_id_bits", "rekey_channel", "udp_encap_port", "datapath",
    "source_auth", "levels", "members", "key_tree", "key_tree_degree", "backward_access_control",
}
LEVEL_KEYS = GROUP_KEYS - {"levels"}
CONTROLLER_KEYS = {"listen", "state", "heartbeat_interval", "handshake_timeout", "idle_timeout",
                   "max_connections", "advertise", "address_hint", "rekey_ttl", "rekey_interface"}


@dataclass(frozen=True)
class LevelConfig:
    group: str
    level: str
    policy: GroupPolicy
    sender_id_bits: int
    datapath: str  # "any" or "xfrm" (xfrm: no shared counter-mode SA, see DESIGN.md s5)
    members: frozenset[str] | None  # the level's own allow-list (None: the member registry decides)
    key_tree: str = "none"  # "lkh": the level's KEK is the root of an LKH key tree (docs/PROTOCOL.md s9)
    key_tree_degree: int = 3
    backward_access_control: bool = False  # LKH: a join refreshes the newcomer's path keys (and the KEK)

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.level)

    @property
    def shared_sender_ids(self) -> bool:
        return self.policy.sender_policy == "shared" and self.sender_id_bits > 0


@dataclass(frozen=True)
class ControllerConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    state: str = "state.db"
    heartbeat_interval: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 120.0
    max_connections: int = 20000
    advertise: bool = True
    address_hint: str = ""
    rekey_ttl: int = 8
    rekey_interface: str = ""


@dataclass(frozen=True)
class Config:
    path: str
    controller: ControllerConfig
    levels: dict[tuple[str, str], LevelConfig] = field(default_factory=dict)

    def group_levels(self, group: str) -> list[LevelConfig]:
        return [lv for (g, _), lv in self.levels.items() if g == group]

    @property
    def groups(self) -> list[str]:
        return sorted({g for g, _ in self.levels})


class _Checker:
    def __init__(self, fname: str) -> None:
        self.fname = fname

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.fname}: {key}: {msg}")

    def get(self, d: dict[str, Any], key: str, path: str, kinds: tuple[type, ...], default: Any) -> Any:
        if key not in d:
            return default
        v = d[key]
        if isinstance(v, bool) and bool not in kinds:
            v = None
        if not isinstance(v, kinds):
            names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                                 list: "a list"}[k] for k in kinds)
            raise self.fail(f"{path}.{key}", f"{d[key]!r} is not {names}")
        return float(v) if float in kinds and not isinstance(v, bool) and isinstance(v, int) else v

    def choice(self, d: dict[str, Any], key: str, path: str, allowed: tuple[str, ...], default: str) -> str:
        v = self.get(d, key, path, (str,), default)
        if v not in allowed:
            raise self.fail(f"{path}.{key}", f"{v!r} is not one of {', '.join(allowed)}")
        return str(v)


def _addr(c: _Checker, v: str, key: str, multicast: bool) -> str:
    try:
        a = ipaddress.ip_address(v)
    except ValueError:
        raise c.fail(key, f"{v!r} is not an IPv4 or IPv6 address") from None
    if multicast and not a.is_multicast:
        raise c.fail(key, f"{v!r} is not a multicast address (224.0.0.0/4 or ff00::/8)")
    return str(a)


def _hostport(c: _Checker, v: str, key: str, multicast: bool) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not (0 if not multicast else 1) <= int(port) < 65536:
        raise c.fail(key, f"{v!r} is not ADDRESS:PORT (IPv6 as [ADDR]:PORT)")
    return (_addr(c, host, key, multicast) if multicast or host not in ("", "localhost") else host or "0.0.0.0",
            int(port))


def _level(c: _Checker, group: str, level: str, d: dict[str, Any], base: dict[str, Any], path: str) -> LevelConfig:
    unknown = set(d) - (GROUP_KEYS if not level else LEVEL_KEYS - {"levels"})
    if unknown:
        raise c.fail(f"{path}.{sorted(unknown)[0]}", f"unknown key (allowed: {', '.join(sorted(GROUP_KEYS))})")
    m = {**base, **d}
    if "dst" not in m:
        raise c.fail(f"{path}.dst", "missing (the multicast destination address)")
    dst = _addr(c, c.get(m, "dst", path, (str,), ""), f"{path}.dst", True)
    src = m.get("source")
    if src is not None:
        src = _addr(c, c.get(m, "source", path, (str,), ""), f"{path}.source", False)
        if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
            raise c.fail(f"{path}.source", "must be of the same IP version as dst")
    proto = m.get("protocol", "udp")
    if isinstance(proto, str):
        if proto not in IP_PROTOCOLS:
            raise c.fail(f"{path}.protocol", f"{proto!r} is not one of {', '.join(IP_PROTOCOLS)} or 0..255")
        ip_proto = IP_PROTOCOLS[proto]
    elif isinstance(proto, int) and not isinstance(proto, bool) and 0 <= proto <= 255:
        ip_proto = proto
    else:
        raise c.fail(f"{path}.protocol", f"{proto!r} is not one of {', '.join(IP_PROTOCOLS)} or 0..255")
    port = c.get(m, "port", path, (int,), None)
    if port is not None and not 0 < port < 65536:
        raise c.fail(f"{path}.port", f"{port} is not in 1..65535")
    protection = c.choice(m, "protection", path, ("esp", "ah"), "esp")
    suites = ESP_SUITES if protection == "esp" else AH_SUITES
    suite = c.choice(m, "suite", path, suites, suites[0])
    mode = c.choice(m, "mode", path, ("transport", "tunnel"), "tunnel")
    tek = c.get(m, "tek_lifetime", path, (int, float), 3600.0)
    kek = c.get(m, "kek_lifetime", path, (int, float), 86400.0)
    atd = c.get(m, "atd", path, (int, float), 1.0)
    dtd = c.get(m, "dtd", path, (int, float), 2.0)
    for k, v, lo in (("tek_lifetime", tek, 1.0), ("kek_lifetime", kek, 1.0), ("atd", atd, 0.0), ("dtd", dtd, 0.0)):
        if v < lo:
            raise c.fail(f"{path}.{k}", f"{v} is below {lo}")
    if atd + dtd >= tek:
        raise c.fail(f"{path}.tek_lifetime", f"{tek} must exceed atd + dtd ({atd + dtd})")
    rw = c.get(m, "replay_window", path, (int,), 64)
    if not MIN_REPLAY_WINDOW <= rw <= MAX_REPLAY_WINDOW:
        raise c.fail(f"{path}.replay_window", f"{rw} is not in {MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW}")
    sender_policy = c.choice(m, "sender_policy", path, ("shared", "per-sender"), "shared")
    counter = get_suite(suite).counter_mode
    bits = c.get(m, "sender_id_bits", path, (int,), 8 if counter and sender_policy == "shared" else 0)
    if not 0 <= bits <= 16:
        raise c.fail(f"{path}.sender_id_bits", f"{bits} is not in 0..16")
    if bits and not counter:
        raise c.fail(f"{path}.sender_id_bits", f"sender IDs apply to counter-mode suites only, not {suite}")
    if sender_policy == "shared" and counter and not bits:
        raise c.fail(f"{path}.sender_id_bits", "a shared counter-mode SA needs sender IDs (1..16 bits), "
                     "or use sender_policy = \"per-sender\"")
    datapath = c.choice(m, "datapath", path, ("any", "xfrm"), "any")
    if datapath == "xfrm" and sender_policy == "shared" and counter:
        raise c.fail(f"{path}.sender_policy", f"'shared' with counter-mode suite {suite} is refused for datapath "
                     "xfrm: Linux cannot put a sender ID in the IV; use sender_policy = \"per-sender\"")
    rekey = m.get("rekey_channel")
    if rekey is None:
        raise c.fail(f"{path}.rekey_channel", "missing (multicast ADDRESS:PORT for rekey datagrams)")
    raddr, rport = _hostport(c, c.get(m, "rekey_channel", path, (str,), ""), f"{path}.rekey_channel", True)
    encap = m.get("udp_encap_port", 4500)
    if encap is not None and (isinstance(encap, bool) or not isinstance(encap, int) or not 0 <= encap < 65536):
        raise c.fail(f"{path}.udp_encap_port", f"{encap!r} is not a port in 1..65535 (or 0 for raw ESP/AH)")
    if encap == 0 or protection == "ah":
        encap = None
    source_auth = c.choice(m, "source_auth", path, ("none", "sign", "sign-batched"), "none")
    if source_auth_refusal(source_auth, datapath):
        raise c.fail(f"{path}.source_auth", f"{source_auth_refusal(source_auth, datapath)} (datapath = \"xfrm\")")
    if source_auth != "none" and protection == "ah":
        raise c.fail(f"{path}.source_auth", f"{source_auth!r} is implemented for protection = \"esp\" only")
    members = m.get("members") if level else d.get("members")
    if members is not None and (not isinstance(members, list) or not all(isinstance(x, str) for x in members)):
        raise c.fail(f"{path}.members", "must be a list of member names")
    key_tree = c.choice(m, "key_tree", path, ("none", "lkh"), "none")
    degree = c.get(m, "key_tree_degree", path, (int,), 3)
    if not 2 <= degree <= 64:
        raise c.fail(f"{path}.key_tree_degree", f"{degree} is not in 2..64")
    bac = c.get(m, "backward_access_control", path, (bool,), False)
    if key_tree == "none" and ("key_tree_degree" in m or bac):
        key = "key_tree_degree" if "key_tree_degree" in m else "backward_access_control"
        raise c.fail(f"{path}.{key}", "applies to key_tree = \"lkh\" only")
    try:
        policy = GroupPolicy(group=group, dst=dst, protocol=protection, suite=suite, mode=mode,  # type: ignore[arg-type]
                             level=level, src=src, ip_proto=ip_proto, port=port, replay_window=rw,
                             sender_policy=sender_policy, source_auth=source_auth,  # type: ignore[arg-type]
                             udp_encap_port=encap, rekey_addr=raddr, rekey_port=rport, atd=atd, dtd=dtd,
                             tek_lifetime=tek, kek_lifetime=kek)
    except PolicyError as exc:
        raise c.fail(path, str(exc)) from None
    return LevelConfig(group, level, policy, bits, datapath, frozenset(members) if members is not None else None,
                       key_tree, degree, bac)


def parse_config(data: dict[str, Any], fname: str = "groupsec.toml") -> Config:
    c = _Checker(fname)
    unknown = set(data) - {"controller", "groups"}
    if unknown:
        raise c.fail(sorted(unknown)[0], "unknown section (allowed: controller, groups)")
    ctl = data.get("controller", {})
    if not isinstance(ctl, dict):
        raise c.fail("controller", "must be a table")
    bad = set(ctl) - CONTROLLER_KEYS
    if bad:
        raise c.fail(f"controller.{sorted(bad)[0]}", f"unknown key (allowed: {', '.join(sorted(CONTROLLER_KEYS))})")
    host, port = _hostport(c, c.get(ctl, "listen", "controller", (str,), f"0.0.0.0:{DEFAULT_PORT}"),
                           "controller.listen", False)
    cc = ControllerConfig(
        listen_host=host, listen_port=port,
        state=c.get(ctl, "state", "controller", (str,), "state.db"),
        heartbeat_interval=c.get(ctl, "heartbeat_interval", "controller", (int, float), 10.0),
        handshake_timeout=c.get(ctl, "handshake_timeout", "controller", (int, float), 10.0),
        idle_timeout=c.get(ctl, "idle_timeout", "controller", (int, float), 120.0),
        max_connections=c.get(ctl, "max_connections", "controller", (int,), 20000),
        advertise=c.get(ctl, "advertise", "controller", (bool,), True),
        address_hint=c.get(ctl, "address_hint", "controller", (str,), ""),
        rekey_ttl=c.get(ctl, "rekey_ttl", "controller", (int,), 8),
        rekey_interface=c.get(ctl, "rekey_interface", "controller", (str,), ""),
    )
    for k in ("heartbeat_interval", "handshake_timeout", "idle_timeout", "max_connections"):
        if getattr(cc, k) <= 0:
            raise c.fail(f"controller.{k}", f"{getattr(cc, k)} must be positive")
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        raise c.fail("groups", "must be a table of groups")
    levels: dict[tuple[str, str], LevelConfig] = {}
    for name, g in groups.items():
        path = f"groups.{name}"
        if not isinstance(g, dict):
            raise c.fail(path, "must be a table")
        if "/" in name or not name:
            raise c.fail(path, "a group name must be non-empty and must not contain '/'")
        lv = g.get("levels")
        if lv is None:
            levels[(name, "")] = _level(c, name, "", g, {}, path)
            continue
        if not isinstance(lv, dict) or not lv:
            raise c.fail(f"{path}.levels", "must be a table of levels, e.g. [groups.video.levels.hd]")
        base = {k: v for k, v in g.items() if k not in ("levels", "members")}
        _level(c, name, "", {k: v for k, v in g.items() if k != "levels"}, {}, path)  # validate the base
        for lname, ld in lv.items():
            if not isinstance(ld, dict):
                raise c.fail(f"{path}.levels.{lname}", "must be a table")
            if "/" in lname or not lname:
                raise c.fail(f"{path}.levels.{lname}", "a level name must be non-empty and must not contain '/'")
            levels[(name, lname)] = _level(c, name, lname, ld, base, f"{path}.levels.{lname}")
    spis: dict[tuple[str, int], str] = {}
    for lc in levels.values():
        ch = (lc.policy.rekey_addr or "", lc.policy.rekey_port or 0)
        other = spis.setdefault(ch, lc.group)
        if other != lc.group:
            raise c.fail(f"groups.{lc.group}.rekey_channel", f"already used by group {other}")
    return Config(fname, cc, levels)


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file (run `groupsec init DIR` first)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p.name}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{p}: {exc.strerror}") from None
    return parse_config(data, p.name)


EXAMPLE = """\
# groupsec controller configuration. Validated at start-up: an error names the key and what is allowed.

[controller]
listen = "0.0.0.0:7443"          # TLS 1.3 (mutual auth) control listener
# state = "state.db"              # SQLite state, relative to this directory
heartbeat_interval = 10.0         # seconds between signed rekey heartbeats
handshake_timeout = 10.0          # seconds a client has to finish TLS and send Register
idle_timeout = 120.0              # a session silent this long is closed
max_connections = 20000
advertise = true                  # zeroconf _groupsec._tcp.local.
# address_hint = "gcks.example.net:7443"   # written into member bundles

# One table per group. Keys: dst, source (SSM), protocol (udp/tcp/any/0-255), port, protection (esp/ah),
# suite, mode (tunnel/transport), tek_lifetime, kek_lifetime, atd, dtd (seconds), replay_window (32..4096),
# sender_policy ("shared": one group SA with RFC 6054 sender IDs; "per-sender": one SA per sender),
# sender_id_bits, rekey_channel ("ADDR:PORT"), udp_encap_port (0 = raw ESP), datapath ("any"/"xfrm"),
# key_tree ("none" or "lkh": an LKH key tree makes eviction one small multicast rekey), key_tree_degree
# (2..64, default 3) and backward_access_control (true: a join refreshes the KEK; key_tree = "lkh" only).
[groups.video]
dst = "239.1.1.1"
protocol = "udp"
port = 5004
protection = "esp"
suite = "aes-gcm-16-128"
mode = "tunnel"
tek_lifetime = 3600
kek_lifetime = 86400
atd = 1.0
dtd = 2.0
replay_window = 64
sender_policy = "shared"
sender_id_bits = 8
rekey_channel = "239.1.1.255:7500"
udp_encap_port = 4500

# Security levels: each level has its own SAs, TEK and KEK and can be rekeyed alone. Keys not set
# here are inherited from the group. `members` is an optional allow-list on top of the member registry.
# [groups.video.levels.hd]
# port = 5006
# suite = "aes-gcm-16-256"
# members = ["alice"]
# [groups.video.levels.sd]
# port = 5004
"""
