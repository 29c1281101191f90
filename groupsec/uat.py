"""Wireshark ``esp_sa`` UAT files: write our SAs so a capture opens decrypted, and read them back.

A record is one line of comma-separated, double-quoted fields, in the column order of
Wireshark's ESP dissector (epan/dissectors/packet-ipsec.c)::

    "IPv4","*","239.1.2.3","0x00001234","AES-GCM with 16 octet ICV [RFC4106]","0x<key+salt>","NULL",""

Columns: protocol (``IPv4``, ``IPv6``; 4.2+ also ``Any``), source and destination address
(``*`` matches any; Wireshark also accepts ``*`` digit wildcards and ``/prefix``), SPI
(``0x`` + 8 hex digits or decimal; ``*`` matches any SPI, and ``*`` in place of hex digits
matches those digits), encryption algorithm and key, authentication algorithm and key
(keys are ``0x`` + hex, or literal ASCII). Wireshark 4.2+ adds two columns (SN length,
ESN high bits) and fills them with defaults when a line has only the first eight, so we
write eight columns, which Debian's 4.0 and every later release read, and accept 8-10.

Anything Wireshark cannot express rides in comment lines, which Wireshark skips:

* ``# groupsec: spi=0x00001234 suite=aes-gcm-16-128 mode=tunnel sender_id_bits=8 ...``
  gives our own attributes of the record that follows;
* ``# groupsec-record: "IPv4","*","239.1.2.3","0x00001235","aes-gmac-128","0x...","",""``
  holds an SA that Wireshark cannot decode (AH, AES-GMAC; ChaCha20 before 4.2) with our
  suite name in the algorithm column.

The file contains key material: it is written with mode 0600 and its ``repr`` is never logged.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from groupsec.errors import BadPacket, ConfigError, PolicyError
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.suites import SUITES, get_suite

# Wireshark's names (esp_encryption_type_vals / esp_authentication_type_vals).
WS_NULL = "NULL"
WS_AES_CBC = "AES-CBC [RFC3602]"
WS_AES_GCM_16 = "AES-GCM with 16 octet ICV [RFC4106]"
WS_CHACHA = "ChaCha20 with Poly1305 [RFC7634]"  # Wireshark 4.2 and later
WS_HMAC = {
    "sha256": "HMAC-SHA-256-128 [RFC4868]",
    "sha384": "HMAC-SHA-384-192 [RFC4868]",
    "sha512": "HMAC-SHA-512-256 [RFC4868]",
}
_WS_HMAC_HASH = {v: k for k, v in WS_HMAC.items()}

MAX_LINES = 100_000
MAX_LINE = 4096


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One SA from a key file. ``spi``/``src``/``dst`` of None are wildcards (``*``);
    ``spi_pattern`` keeps a partial wildcard such as ``0x0000****``."""

    ip_version: int | None  # None: "Any"
    src: str | None
    dst: str | None
    spi: int | None
    suite: str
    enc_key: bytes = field(repr=False)
    auth_key: bytes = field(repr=False)
    spi_pattern: str | None = None
    mode: str | None = None  # None: unknown (decide from the next header)
    replay_window: int = 64
    sender_id_bits: int = 0
    udp_encap_port: int | None = None
    group: str = ""
    level: str = ""
    line: int = 0

    @property
    def protocol(self) -> str:
        return SUITES[self.suite].protocol

    def matches(self, spi: int, src: str, dst: str, protocol: str = "esp") -> bool:
        if protocol != self.protocol:
            return False
        if self.spi is not None and self.spi != spi:
            return False
        if self.spi_pattern is not None:
            text = f"0x{spi:08x}"
            pat = self.spi_pattern.lower()
            if len(pat) != len(text) or any(p not in ("*", t) for p, t in zip(pat[2:], text[2:], strict=True)):
                return False
        version = ipaddress.ip_address(dst).version
        if self.ip_version is not None and self.ip_version != version:
            return False
        return _addr_match(self.src, src) and _addr_match(self.dst, dst)

    def sa_params(self, spi: int, dst: str, src: str | None = None, mode: str | None = None) -> SAParams:
        """A concrete SA for one packet's SPI and addresses (fills the wildcards)."""
        return SAParams(
            spi=spi, protocol=self.protocol, suite=self.suite,  # type: ignore[arg-type]
            mode=(mode or self.mode or "transport"), dst=dst, src=src if self.src is not None else None,  # type: ignore[arg-type]
            enc_key=self.enc_key, auth_key=self.auth_key, replay_window=self.replay_window,
            sender_id_bits=self.sender_id_bits, udp_encap_port=self.udp_encap_port,
            group=self.group, level=self.level,
        )


def _addr_match(pattern: str | None, addr: str) -> bool:
    if pattern is None:
        return True
    if "/" in pattern:
        try:
            return ipaddress.ip_address(addr) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    try:
        return ipaddress.ip_address(pattern) == ipaddress.ip_address(addr)
    except ValueError:
        return False


# --- writing ------------------------------------------------------------------------------------


def wireshark_algorithms(suite_name: str) -> tuple[str, str] | None:
    """(encryption, authentication) as Wireshark names them, or None if Wireshark (4.0) cannot
    decode this suite (AH, AES-GMAC, ChaCha20-Poly1305)."""
    s = get_suite(suite_name)
    if s.protocol != "esp":
        return None
    if s.kind == "aead" and suite_name.startswith("aes-gcm-16"):
        return WS_AES_GCM_16, WS_NULL
    if s.kind == "cbc-hmac" and s.hash_name in WS_HMAC:
        return WS_AES_CBC, WS_HMAC[s.hash_name]
    if s.kind == "null-hmac" and s.hash_name in WS_HMAC:
        return WS_NULL, WS_HMAC[s.hash_name]
    return None


def _hex(key: bytes) -> str:
    return "0x" + key.hex() if key else ""


def _quote(fields: Iterable[str]) -> str:
    return ",".join('"' + f.replace("\\", "\\x5c").replace('"', "\\x22") + '"' for f in fields)


def esp_sa_record(sa: SAParams, *, src: str | None = None, chacha: bool = False) -> str | None:
    """The Wireshark record for one SA (no newline), or None when Wireshark cannot decode it.
    ``src`` overrides the source column (default: the SA's source, or ``*``). ``chacha=True``
    writes ChaCha20-Poly1305 SAs too (only Wireshark 4.2+ reads them)."""
    algs = wireshark_algorithms(sa.suite)
    if algs is None and chacha and sa.suite == "chacha20-poly1305":
        algs = (WS_CHACHA, WS_NULL)
    if algs is None:
        return None
    proto = "IPv6" if sa.ip_version == 6 else "IPv4"
    enc_key = sa.enc_key if algs[0] != WS_NULL else b""
    return _quote([proto, src or sa.src or "*", sa.dst, f"0x{sa.spi:08x}", algs[0], _hex(enc_key),
                   algs[1], _hex(sa.auth_key)])


def _hint(sa: SAParams) -> str:
    parts = [f"spi=0x{sa.spi:08x}", f"suite={sa.suite}", f"mode={sa.mode}", f"replay_window={sa.replay_window}",
             f"sender_id_bits={sa.sender_id_bits}"]
    if sa.udp_encap_port is not None:
        parts.append(f"udp_encap_port={sa.udp_encap_port}")
    if sa.group:
        parts.append(f"group={sa.group}")
    if sa.level:
        parts.append(f"level={sa.level}")
    return "# groupsec: " + " ".join(parts)


def format_esp_sa(sas: Iterable[SAParams], *, chacha: bool = False) -> str:
    """The whole key file for these SAs (one per SPI; later duplicates are dropped)."""
    lines = ["# Wireshark esp_sa UAT written by groupsec. Contains SECRET KEYS: keep it 0600.",
             "# Use: copy to ~/.config/wireshark/esp_sa (or a profile), or run groupsec inspect CAPTURE --keys FILE."]
    seen: set[tuple[int, str]] = set()
    for sa in sas:
        if (sa.spi, sa.dst) in seen:
            continue
        seen.add((sa.spi, sa.dst))
        lines.append(_hint(sa))
        rec = esp_sa_record(sa, chacha=chacha)
        if rec is None:
            proto = "IPv6" if sa.ip_version == 6 else "IPv4"
            rec = "# groupsec-record: " + _quote([proto, sa.src or "*", sa.dst, f"0x{sa.spi:08x}", sa.suite,
                                                  _hex(sa.enc_key), sa.suite, _hex(sa.auth_key)])
        lines.append(rec)
    return "\n".join(lines) + "\n"


def write_esp_sa(path: str, sas: Iterable[SAParams], *, chacha: bool = False) -> None:
    """Write the key file with mode 0600 (created that way, never world-readable for a moment)."""
    text = format_esp_sa(sas, chacha=chacha)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def tshark_uat_options(sas: Iterable[SAParams]) -> list[str]:
    """``-o uat:esp_sa:...`` arguments for tshark (keys appear on a command line: tests only)."""
    out: list[str] = []
    for sa in sas:
        rec = esp_sa_record(sa)
        if rec is not None:
            out += ["-o", "uat:esp_sa:" + rec]
    return out


# --- reading ------------------------------------------------------------------------------------


def _split_untrusted(text: str, where: str) -> list[str]:
    """Split one UAT line into its fields: quoted strings with \\xNN escapes, separated by commas."""
    fields: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] != '"':
            raise BadPacket(f"{where}: expected a quoted field at column {i + 1}")
        i += 1
        buf: list[str] = []
        while True:
            if i >= n:
                raise BadPacket(f"{where}: unterminated quoted field")
            c = text[i]
            if c == '"':
                i += 1
                break
            if c == "\\":
                esc = text[i + 1:i + 4]
                if len(esc) == 3 and esc[0] == "x":
                    try:
                        buf.append(chr(int(esc[1:], 16)))
                    except ValueError:
                        raise BadPacket(f"{where}: bad escape \\{esc}") from None
                    i += 4
                    continue
                raise BadPacket(f"{where}: bad escape at column {i + 1}")
            buf.append(c)
            i += 1
        fields.append("".join(buf))
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return fields
        if text[i] != ",":
            raise BadPacket(f"{where}: expected ',' at column {i + 1}")
        i += 1


def _key_untrusted(value: str, where: str) -> bytes:
    if value.lower().startswith("0x"):
        digits = value[2:]
        if len(digits) % 2:
            digits = "0" + digits  # as Wireshark does
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise BadPacket(f"{where}: key {value[:6]}... is not hex") from None
    return value.encode("latin-1", errors="replace")


def _suite_from_wireshark(enc: str, enc_key: bytes, auth: str, where: str) -> str:
    if enc == WS_AES_GCM_16 and auth == WS_NULL:
        return {20: "aes-gcm-16-128", 36: "aes-gcm-16-256"}.get(len(enc_key)) or _bad(
            where, f"AES-GCM key of {len(enc_key)} bytes (need 20 or 36, salt included)")
    if enc == WS_CHACHA and auth == WS_NULL:
        return "chacha20-poly1305"
    hash_name = _WS_HMAC_HASH.get(auth)
    if hash_name is not None:
        for name, s in SUITES.items():
            if s.protocol != "esp" or s.hash_name != hash_name:
                continue
            if enc == WS_NULL and s.kind == "null-hmac":
                return name
            if enc == WS_AES_CBC and s.kind == "cbc-hmac" and s.enc_key_len == len(enc_key):
                return name
    return _bad(where, f"unsupported algorithms {enc!r} / {auth!r} with a {len(enc_key)}-byte key")


def _bad(where: str, what: str) -> str:
    raise BadPacket(f"{where}: {what}")


def _hints_untrusted(text: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split():
        k, sep, v = part.partition("=")
        if not sep:
            raise BadPacket(f"{where}: groupsec hint {part!r} is not key=value")
        out[k] = v
    return out


def _int(value: str, where: str, what: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise BadPacket(f"{where}: {what} {value!r} is not a number") from None


def parse_esp_sa_untrusted(text: str, name: str = "esp_sa") -> list[KeyEntry]:
    """Every SA of a key file. A malformed line raises BadPacket naming the file and line."""
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise BadPacket(f"{name}: more than {MAX_LINES} lines")
    entries: list[KeyEntry] = []
    hints: dict[str, str] = {}
    for lineno, raw in enumerate(lines, 1):
        where = f"{name}:{lineno}"
        if len(raw) > MAX_LINE:
            raise BadPacket(f"{where}: line longer than {MAX_LINE} characters")
        line = raw.strip()
        ours = False
        if line.startswith("# groupsec:"):
            hints = _hints_untrusted(line[len("# groupsec:"):], where)
            continue
        if line.startswith("# groupsec-record:"):
            line, ours = line[len("# groupsec-record:"):].strip(), True
        elif not line or line.startswith("#"):
            continue
        fields = _split_untrusted(line, where)
        if not 8 <= len(fields) <= 10:
            raise BadPacket(f"{where}: {len(fields)} fields, an esp_sa record has 8 (10 in Wireshark 4.2+)")
        proto, src, dst, spi_text, enc, enc_key_text, auth, auth_key_text = fields[:8]
        if len(fields) >= 9 and fields[8] not in ("", "32-bit"):
            raise BadPacket(f"{where}: extended sequence numbers are not used on multicast SAs")
        version = {"IPv4": 4, "IPv6": 6, "Any": None}.get(proto, 0)
        if version == 0:
            raise BadPacket(f"{where}: protocol {proto!r} is not one of IPv4, IPv6, Any")
        enc_key, auth_key = _key_untrusted(enc_key_text, where), _key_untrusted(auth_key_text, where)
        if ours:
            if enc not in SUITES:
                raise BadPacket(f"{where}: {enc!r} is not a groupsec suite")
            suite = enc
        else:
            suite = _suite_from_wireshark(enc, enc_key, auth, where)
        if hints.get("suite", suite) != suite:
            raise BadPacket(f"{where}: groupsec hint suite={hints['suite']} does not match the record ({suite})")
        spi, pattern = _spi_untrusted(spi_text, where)
        addrs = [_addr_untrusted(a, version, where) for a in (src, dst)]
        try:
            mode = hints.get("mode")
            if mode not in (None, "transport", "tunnel"):
                raise BadPacket(f"{where}: mode {mode!r} is not one of transport, tunnel")
            port = hints.get("udp_encap_port")
            entry = KeyEntry(
                ip_version=version, src=addrs[0], dst=addrs[1], spi=spi, suite=suite,
                enc_key=enc_key if get_suite(suite).enc_key_len else b"", auth_key=auth_key,
                spi_pattern=pattern, mode=mode,
                replay_window=_int(hints.get("replay_window", "64"), where, "replay_window"),
                sender_id_bits=_int(hints.get("sender_id_bits", "0"), where, "sender_id_bits"),
                udp_encap_port=_int(port, where, "udp_encap_port") if port else None,
                group=hints.get("group", ""), level=hints.get("level", ""), line=lineno,
            )
            # validate sizes and policy once, with a placeholder SPI/address if wildcarded
            entry.sa_params(spi if spi is not None else 256,
                            addrs[1] if addrs[1] and "/" not in addrs[1] else ("::1" if version == 6 else "127.0.0.1"))
        except PolicyError as exc:
            raise BadPacket(f"{where}: {exc}") from None
        entries.append(entry)
        hints = {}
    return entries


def _spi_untrusted(text: str, where: str) -> tuple[int | None, str | None]:
    if text == "*":
        return None, None
    if "*" in text:
        if len(text) != 10 or not text.lower().startswith("0x") or any(
                c not in "0123456789abcdefABCDEF*" for c in text[2:]):
            raise BadPacket(f"{where}: SPI pattern {text!r} must be 0x and 8 hex digits or '*'")
        return None, text
    try:
        spi = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise BadPacket(f"{where}: SPI {text!r} is not a number") from None
    if not 0 <= spi <= 0xFFFFFFFF:
        raise BadPacket(f"{where}: SPI {text!r} is out of range")
    return spi, None


def _addr_untrusted(text: str, version: int | None, where: str) -> str | None:
    if text in ("*", ""):
        return None
    try:
        net = ipaddress.ip_network(text, strict=False) if "/" in text else None
        addr = net.network_address if net is not None else ipaddress.ip_address(text)
    except ValueError:
        raise BadPacket(f"{where}: {text!r} is not an address, '*' or address/prefix") from None
    if version is not None and addr.version != version:
        raise BadPacket(f"{where}: address {text} is not IPv{version}")
    return str(net) if net is not None else str(addr)


def load_esp_sa(path: str) -> list[KeyEntry]:
    """Read a key file; every problem is a one-line ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LINES * 200)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read key file: {exc.strerror}") from None
    try:
        return parse_esp_sa_untrusted(data.decode("utf-8", errors="strict"), name=path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except BadPacket as exc:
        raise ConfigError(str(exc)) from None
