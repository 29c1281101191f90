"""The agent's configuration: a TOML file (``groupsec-agent run --config agent.toml``), with
every setting also available as a flag (flags win). See docs/AGENT.md for the format.

Every mistake is a ``ConfigError`` whose text is one line naming the file, the key and what
is allowed, e.g. ``agent.toml: group[0].role: 'admin' is not one of sender, receiver``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groupsec.errors import ConfigError

DATAPATHS = ("userspace", "xfrm")
ROLES = ("sender", "receiver")
DEFAULT_PORT = 7443  # the controller's default TLS port (groupsec.controller.config)
DEFAULT_STATE_DIR = "/run/groupsec-agent"


@dataclass(frozen=True)
class GroupSpec:
    group: str
    role: str
    level: str = ""
    relay_listen: tuple[str, int] | None = None  # apps send plaintext here
    relay_deliver: tuple[str, int] | None = None  # decrypted payloads go here
    relay_group_port: int | None = None  # inner destination port when the policy names none

    @property
    def name(self) -> str:
        return f"{self.group}/{self.level}" if self.level else self.group

    @property
    def has_relay(self) -> bool:
        return self.relay_listen is not None or self.relay_deliver is not None


@dataclass(frozen=True)
class TunSpec:
    name: str = "gsec0"
    mtu: int = 1400
    groups: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TestHooks:
    """For acceptance tests only: make loss happen on purpose."""

    drop_multicast_rekey: float = 0.0  # fraction of rekey-channel datagrams dropped on receipt
    ignore_unicast_rekey: bool = False  # drop RekeyPush over TLS (forces the multicast/resync paths)


@dataclass(frozen=True)
class AgentConfig:
    bundle: Path
    groups: tuple[GroupSpec, ...]
    controller: tuple[str, int] | None = None  # None: the bundle's hint, else zeroconf discovery
    controllers: tuple[tuple[str, int], ...] = ()  # "h1:p,h2:p": every controller, tried in order (HA)
    discover: bool = False  # controller = "discover": always browse _groupsec._tcp
    datapath: str = "userspace"
    interface: str | None = None
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    ttl: int = 1
    loop: bool | None = None
    wire: str = "auto"
    tun: TunSpec | None = None
    ack_jitter: float = 1.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    ping_interval: float = 15.0
    ping_timeout: float = 10.0
    handshake_timeout: float = 10.0
    discovery_timeout: float = 10.0
    status_interval: float = 1.0
    log_level: str = "info"
    testing: TestHooks = field(default_factory=TestHooks)
    source: str = "flags"  # the file name used in error messages


# --- parsing helpers -----------------------------------------------------------------------


class _Where:
    def __init__(self, source: str) -> None:
        self.source = source

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {msg}")


def parse_hostport(text: str, default_port: int | None = None, *, what: str = "address") -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, or ``:port`` / bare ``port`` (127.0.0.1). Raises ValueError."""
    text = str(text).strip()
    if text.isdigit():
        host, port = "127.0.0.1", text
    elif text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:  # a bare IPv6 address
        try:
            host, port = str(ipaddress.IPv6Address(text)), ""
        except ValueError:
            raise ValueError(f"{what} {text!r} is not host:port (write IPv6 as [addr]:port)") from None
    else:
        host, port = text, ""
    host = host or "127.0.0.1"
    if not port:
        if default_port is None:
            raise ValueError(f"{what} {text!r} has no port (host:port)")
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {text!r}: port must be 0..65535")
    return host, int(port)


def parse_group_flag(text: str) -> GroupSpec:
    """``G:role[:level]`` as given to ``--group``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ConfigError(f"--group {text!r}: expected GROUP:sender|receiver[:LEVEL]")
    if parts[1] not in ROLES:
        raise ConfigError(f"--group {text!r}: role {parts[1]!r} is not one of {', '.join(ROLES)}")
    return GroupSpec(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def parse_relay_flag(text: str) -> tuple[str, tuple[str, int] | None, tuple[str, int] | None, int | None]:
    """``--relay G=LISTEN,DELIVER[,GROUPPORT]``; LISTEN/DELIVER are host:port or port, or '-'."""
    name, eq, rest = text.partition("=")
    parts = rest.split(",")
    if not eq or not name or len(parts) not in (2, 3):
        raise ConfigError(f"--relay {text!r}: expected GROUP=LISTEN,DELIVER[,GROUP_PORT] (ports or host:port, '-' for none)")
    try:
        listen = None if parts[0] in ("", "-") else parse_hostport(parts[0], what="relay listen")
        deliver = None if parts[1] in ("", "-") else parse_hostport(parts[1], what="relay deliver")
        gport = int(parts[2]) if len(parts) == 3 and parts[2] not in ("", "-") else None
    except ValueError as exc:
        raise ConfigError(f"--relay {text!r}: {exc}") from None
    return name, listen, deliver, gport


def _typed(w: _Where, d: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, prefix: str = "") -> Any:
    if key not in d:
        return default
    v = d[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise w.err(prefix + key, f"{v!r} must be a {names}")
    return v


def _positive(w: _Where, key: str, v: float) -> float:
    if v <= 0:
        raise w.err(key, f"{v!r} must be above 0")
    return v


# --- TOML ----------------------------------------------------------------------------------

TOP_KEYS = {"bundle", "controller", "datapath", "interface", "state_dir", "ttl", "loop", "wire", "group", "tun",
            "session", "testing", "log_level"}
GROUP_KEYS = {"name", "role", "level", "relay_listen", "relay_deliver", "relay_group_port"}
SESSION_KEYS = {"ack_jitter", "reconnect_min", "reconnect_max", "ping_interval", "ping_timeout",
                "handshake_timeout", "discovery_timeout", "status_interval"}


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such configuration file") from None
    except PermissionError:
        raise ConfigError(f"{p}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def from_dict(d: dict[str, Any], source: str = "agent.toml", base_dir: Path | None = None) -> AgentConfig:
    """Validate a parsed TOML document into an AgentConfig (one-line ConfigError otherwise)."""
    w = _Where(source)
    base = base_dir or Path(".")
    for k in d:
        if k not in TOP_KEYS:
            raise w.err(k, f"unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    kw: dict[str, Any] = {"source": source}
    bundle = _typed(w, d, "bundle", str, None)
    if bundle is None:
        raise w.err("bundle", "missing: the credential bundle from `groupsec member add --out` is required")
    kw["bundle"] = (base / bundle) if not os.path.isabs(bundle) else Path(bundle)
    ctl = _typed(w, d, "controller", str, None)
    if ctl == "discover":
        kw["discover"] = True
    elif ctl is not None:
        try:
            kw["controllers"] = tuple(parse_hostport(c.strip(), DEFAULT_PORT, what="controller")
                                      for c in ctl.split(",") if c.strip())
            kw["controller"] = kw["controllers"][0]
        except (ValueError, IndexError) as exc:
            raise w.err("controller", f"{exc} (or \"discover\")") from None
    dp = _typed(w, d, "datapath", str, "userspace")
    if dp not in DATAPATHS:
        raise w.err("datapath", f"{dp!r} is not one of {', '.join(DATAPATHS)}")
    kw["datapath"] = dp
    kw["interface"] = _typed(w, d, "interface", str, None)
    sd = _typed(w, d, "state_dir", str, DEFAULT_STATE_DIR)
    kw["state_dir"] = (base / sd) if not os.path.isabs(sd) else Path(sd)
    ttl = _typed(w, d, "ttl", int, 1)
    if not 1 <= ttl <= 255:
        raise w.err("ttl", f"{ttl} is outside 1..255")
    kw["ttl"] = ttl
    kw["loop"] = _typed(w, d, "loop", bool, None)
    wire = _typed(w, d, "wire", str, "auto")
    if wire not in ("auto", "encap", "raw"):
        raise w.err("wire", f"{wire!r} is not one of auto, encap, raw")
    kw["wire"] = wire
    lvl = _typed(w, d, "log_level", str, "info")
    if lvl not in ("debug", "info", "warning", "error"):
        raise w.err("log_level", f"{lvl!r} is not one of debug, info, warning, error")
    kw["log_level"] = lvl
    groups = d.get("group", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise w.err("group", "must be an array of tables ([[group]])")
    kw["groups"] = tuple(_group(w, i, g) for i, g in enumerate(groups))
    if "tun" in d:
        t = d["tun"]
        if not isinstance(t, dict):
            raise w.err("tun", "must be a table ([tun])")
        for k in t:
            if k not in ("name", "mtu", "groups"):
                raise w.err(f"tun.{k}", "unknown key (allowed: name, mtu, groups)")
        mtu = _typed(w, t, "mtu", int, 1400, "tun.")
        if not 576 <= mtu <= 9000:
            raise w.err("tun.mtu", f"{mtu} is outside 576..9000")
        gl = _typed(w, t, "groups", list, None, "tun.")
        if gl is not None and not all(isinstance(x, str) for x in gl):
            raise w.err("tun.groups", "must be a list of group names")
        name = _typed(w, t, "name", str, "gsec0", "tun.")
        if not 1 <= len(name) <= 15:
            raise w.err("tun.name", f"{name!r} must be 1..15 characters")
        kw["tun"] = TunSpec(name, mtu, tuple(gl) if gl is not None else None)
    s = d.get("session", {})
    if not isinstance(s, dict):
        raise w.err("session", "must be a table ([session])")
    for k in s:
        if k not in SESSION_KEYS:
            raise w.err(f"session.{k}", f"unknown key (allowed: {', '.join(sorted(SESSION_KEYS))})")
    for k in SESSION_KEYS:
        if k in s:
            v = _typed(w, s, k, float, None, "session.")
            kw[k] = v if k == "ack_jitter" and v == 0 else _positive(w, f"session.{k}", v)
    if kw.get("reconnect_min", 0.5) > kw.get("reconnect_max", 30.0):
        raise w.err("session.reconnect_min", "must not be above session.reconnect_max")
    t = d.get("testing", {})
    if not isinstance(t, dict):
        raise w.err("testing", "must be a table ([testing])")
    for k in t:
        if k not in ("drop_multicast_rekey", "ignore_unicast_rekey"):
            raise w.err(f"testing.{k}", "unknown key (allowed: drop_multicast_rekey, ignore_unicast_rekey)")
    drop = _typed(w, t, "drop_multicast_rekey", float, 0.0, "testing.")
    if not 0.0 <= drop < 1.0:
        raise w.err("testing.drop_multicast_rekey", f"{drop} is outside 0.0..1.0 (exclusive)")
    kw["testing"] = TestHooks(drop, _typed(w, t, "ignore_unicast_rekey", bool, False, "testing."))
    return _finish(AgentConfig(**kw), w)


def _group(w: _Where, i: int, g: dict[str, Any]) -> GroupSpec:
    p = f"group[{i}]."
    for k in g:
        if k not in GROUP_KEYS:
            raise w.err(p + k, f"unknown key (allowed: {', '.join(sorted(GROUP_KEYS))})")
    name = _typed(w, g, "name", str, None, p)
    if not name:
        raise w.err(p + "name", "missing: the group's name")
    role = _typed(w, g, "role", str, None, p)
    if role not in ROLES:
        raise w.err(p + "role", f"{role!r} is not one of {', '.join(ROLES)}")
    level = _typed(w, g, "level", str, "", p)
    addrs = []
    for k in ("relay_listen", "relay_deliver"):
        v = _typed(w, g, k, (str, int), None, p)
        try:
            addrs.append(None if v is None else parse_hostport(str(v), what=k))
        except ValueError as exc:
            raise w.err(p + k, str(exc)) from None
    gp = _typed(w, g, "relay_group_port", int, None, p)
    if gp is not None and not 1 <= gp <= 65535:
        raise w.err(p + "relay_group_port", f"{gp} is outside 1..65535")
    return GroupSpec(name, role, level, addrs[0], addrs[1], gp)


def _finish(cfg: AgentConfig, w: _Where) -> AgentConfig:
    if not cfg.groups:
        raise w.err("group", "no group to join: add a [[group]] table or --group G:role[:level]")
    seen = set()
    for g in cfg.groups:
        if (g.group, g.level) in seen:
            raise w.err("group", f"{g.name!r} is listed twice")
        seen.add((g.group, g.level))
    if cfg.interface is not None:
        try:
            ipaddress.ip_address(cfg.interface)
        except ValueError:
            if not cfg.interface or len(cfg.interface) > 15 or "/" in cfg.interface:
                raise w.err("interface", f"{cfg.interface!r} is not an interface name or address") from None
    return cfg


def load(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read the TOML file (if any) and apply flag overrides (a dict in the TOML's shape; lists
    of groups given as flags replace the file's)."""
    d: dict[str, Any] = {}
    source = "flags"
    base = Path(".")
    if path is not None:
        d = load_toml(path)
        source = str(path)
        base = Path(path).resolve().parent
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k == "session" or k == "testing" or k == "tun":
            merged = dict(d.get(k, {}))
            merged.update(v)
            d[k] = merged
        else:
            d[k] = v
    return from_dict(d, source, base)


# --- the credential bundle ------------------------------------------------------------------

_KEY_NAMES = ("member.key", "key.pem", "client.key", "private.key")
_CERT_NAMES = ("member.crt", "cert.pem", "client.crt", "member.pem")
_CA_NAMES = ("ca.crt", "ca.pem")
_HINT_NAMES = ("controller", "controller.txt", "bundle.toml")


@dataclass(frozen=True)
class Bundle:
    """A member's credentials: private key, certificate, the controller CA, and an optional
    hint of the controller's address. ``path`` is the bundle directory (or file)."""

    path: Path
    key_path: Path
    cert_path: Path
    ca_pem: bytes = field(repr=False)
    name: str  # the certificate's subject CN (the identity the controller will see)
    ca_fingerprint: str  # SHA-256 of the CA certificate (DER), hex
    controller_hint: tuple[str, int] | None = None
    not_after: float = 0.0


def _pem_blocks(data: bytes, kind: bytes) -> list[bytes]:
    out = []
    begin = b"-----BEGIN " + kind
    i = 0
    while (i := data.find(begin, i)) >= 0:
        end = data.find(b"-----END ", i)
        stop = data.find(b"-----", end + 9) if end >= 0 else -1
        if stop < 0:
            break
        out.append(data[i : stop + 5] + b"\n")
        i = stop + 5
    return out


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Load and check a credential bundle: a directory (``member.key``, ``member.crt``,
    ``ca.crt``, optional ``bundle.toml`` with ``controller = "host:port"``) or one PEM file
    holding the key, the member certificate and the CA certificate. ConfigError otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import Encoding

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: credential bundle not found")

    def pick(names: tuple[str, ...], what: str, suffixes: tuple[str, ...]) -> Path:
        for n in names:
            if (p / n).is_file():
                return p / n
        found = sorted(f for f in p.iterdir() if f.suffix in suffixes and f.name not in _CA_NAMES)
        if len(found) == 1:
            return found[0]
        raise ConfigError(f"{p}: the bundle has no {what} (expected one of {', '.join(names)})")

    def read(f: Path) -> bytes:
        try:
            return f.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{f}: cannot read: {exc.strerror}") from None

    hint: tuple[str, int] | None = None
    if p.is_dir():
        key_path = pick(_KEY_NAMES, "private key", (".key",))
        cert_path = pick(_CERT_NAMES, "certificate", (".crt", ".pem"))
        ca_path = next((p / n for n in _CA_NAMES if (p / n).is_file()), None)
        if ca_path is None:
            raise ConfigError(f"{p}: the bundle has no CA certificate (expected ca.crt)")
        key_data, cert_data, ca_data = read(key_path), read(cert_path), read(ca_path)
        for n in _HINT_NAMES:
            hp = p / n
            if hp.is_file():
                hint = _hint(hp, read(hp))
                break
        if hint is None and (p / "bundle.json").is_file():
            import json

            try:
                h = json.loads(read(p / "bundle.json")).get("controller")
            except (ValueError, AttributeError):
                raise ConfigError(f"{p / 'bundle.json'}: not a JSON object") from None
            if isinstance(h, str) and h:
                hint = _hint(p / "bundle.json", f"controller = {h}".encode())
    else:
        data = read(p)
        keys = _pem_blocks(data, b"PRIVATE KEY") or _pem_blocks(data, b"EC PRIVATE KEY")
        certs = _pem_blocks(data, b"CERTIFICATE-----")
        if len(keys) != 1 or len(certs) != 2:
            raise ConfigError(f"{p}: a one-file bundle must hold 1 private key and 2 certificates "
                              f"(member, CA); found {len(keys)} and {len(certs)}")
        key_data, key_path, cert_path = keys[0], p, p
        parsed = []
        for c in certs:
            try:
                parsed.append(x509.load_pem_x509_certificate(c))
            except ValueError:
                raise ConfigError(f"{p}: a certificate in the bundle does not parse") from None
        ca_first = _is_ca(parsed[0])
        cert_data, ca_data = (certs[1], certs[0]) if ca_first else (certs[0], certs[1])
        for line in data.decode("utf-8", "replace").splitlines():
            if line.lstrip("# ").lower().startswith("controller"):
                hint = _hint(p, line.lstrip("# ").encode())
    try:
        key = serialization.load_pem_private_key(key_data, None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_path}: not a usable unencrypted PEM private key ({exc})"[:300]) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
        ca = x509.load_pem_x509_certificate(ca_data)
    except ValueError:
        raise ConfigError(f"{cert_path}: the member or CA certificate is not PEM") from None
    pub = key.public_key().public_bytes(Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != pub:
        raise ConfigError(f"{cert_path}: the certificate does not match the private key {key_path.name}")
    if not _is_ca(ca):
        raise ConfigError(f"{p}: the CA certificate is not a CA (basicConstraints CA:TRUE missing)")
    if cert.issuer != ca.subject:
        raise ConfigError(f"{cert_path}: the certificate was not issued by the bundle's CA")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base
        raise ConfigError(f"{cert_path}: the certificate's signature does not verify against the CA ({type(exc).__name__})") from None
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        raise ConfigError(f"{cert_path}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now + dt.timedelta(minutes=10):
        raise ConfigError(f"{cert_path}: the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}")
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cns:
        raise ConfigError(f"{cert_path}: the certificate has no subject CN (the member name)")
    if os.stat(key_path).st_mode & 0o077:
        logging_warn(f"{key_path}: private key is readable by group/others; chmod 600 it")
    return Bundle(p, key_path, cert_path, ca.public_bytes(Encoding.PEM), str(cns[0].value),
                  ca.fingerprint(hashes.SHA256()).hex(), hint, cert.not_valid_after_utc.timestamp())


def _is_ca(cert: Any) -> bool:
    from cryptography import x509

    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _hint(src: Path, data: bytes) -> tuple[str, int] | None:
    """``controller = "host:port"`` (TOML-ish), ``controller: host:port`` or a bare ``host:port``."""
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip().lstrip("#").strip()
        low = line.lower()
        value = None
        for k in ("controller", "address_hint", "address"):
            if low.startswith(k):
                rest = line[len(k):].strip()
                if rest[:1] in ("=", ":"):
                    value = rest[1:].strip().strip('"').strip("'")
                break
        if value is None and src.name in ("controller", "controller.txt") and line and not raw.lstrip().startswith("#"):
            value = line
        if value:
            try:
                return parse_hostport(value, DEFAULT_PORT, what="controller hint")
            except ValueError:
                raise ConfigError(f"{src}: controller hint {value!r} is not host:port") from None
    return None


def logging_warn(msg: str) -> None:
    import logging

    logging.getLogger("groupsec.agent").warning("%s", msg)
