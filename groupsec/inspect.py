"""``groupsec inspect CAPTURE --keys ESP_SA_FILE``: why was this packet dropped?

Reads a capture (pcap or pcapng; Ethernet, raw IP, Linux cooked, loopback) and a key file in
Wireshark's ``esp_sa`` format (:mod:`groupsec.uat`), and runs every ESP, AH and ESP-in-UDP
packet through the same engine the data paths use (:func:`groupsec.ipsec.packet.unprotect_untrusted`),
one receiver per SA, in capture order. The verdict is the engine's drop reason:

``ok``, ``auth-failed`` (ICV mismatch), ``replay`` (duplicate or too old for the replay
window), ``unknown-spi`` (no SA in the key file), ``malformed`` (truncated, bad padding or
lengths, an IP header that does not parse), ``policy`` (a tunnel's inner packet does not
match the SA), ``sa-expired``.

ESP-in-UDP is recognised on port 4500, on the ports named in the key file, and on any UDP
packet whose first four bytes are the SPI of an SA in the key file.

Source authentication (``--sender-keys FILE``): for groups with ``source_auth`` "sign" or
"sign-batched", ESP-in-UDP packets to the group's address must carry a signature trailer of
the sender that the SA (per-sender SAs) or the RFC 6054 sender ID names; a packet whose
signature does not verify (a forgery by a member that holds the group keys, a revoked or
unknown sender) gets the verdict ``source-auth-failed``, one without the group's trailer
``malformed``. The file is JSON, public keys only (nothing secret)::

    {"source_auth": [{"dst": "239.1.2.3", "mode": "sign-batched",
                      "sender_keys": {"7": "<64 hex digits: raw Ed25519 public key>"},
                      "owners": {"0x1a2b3c4d": 7}}]}

``owners`` (per-sender SAs: SPI -> the owner's sender ID) is optional; without an entry a
per-sender SA's key ID is its SPI. ``format_sender_keys`` writes such a file.
"""

from __future__ import annotations

import argparse
import json
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from groupsec import pcap, uat
from groupsec.errors import BadPacket, ConfigError, GroupSecError, PacketDropped
from groupsec.ipsec.ip import (
    PROTO_AH,
    PROTO_ESP,
    PROTO_IPIP,
    PROTO_IPV6,
    PROTO_UDP,
    build_udp_packet,
    canonical,
    parse_ip_untrusted,
)
from groupsec.ipsec.packet import unprotect_untrusted
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sad import SAD
from groupsec.ipsec.sourceauth import SourceAuthenticator, load_public_key_untrusted
from groupsec.ipsec.udpencap import ESP_IN_UDP_PORT, classify_untrusted

MAX_CAPTURE = 1 << 31
PREVIEW = 24


@dataclass(frozen=True, slots=True)
class Verdict:
    index: int
    timestamp: float
    protocol: str  # "esp", "esp-in-udp", "ah", or "?" when the packet did not parse
    spi: int | None
    seq: int | None
    src: str | None
    dst: str | None
    sender_id: int | None
    verdict: str
    detail: str
    payload: bytes | None  # the decrypted upper-layer payload (UDP payload when UDP)
    inner: str | None  # e.g. "udp 10.0.0.1:5000 -> 239.1.2.3:5001" (tunnel: the inner packet)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "spi": self.spi, "seq": self.seq, "verdict": self.verdict,
            "payload_hex": self.payload.hex() if self.payload is not None else None,
            "time": self.timestamp, "protocol": self.protocol, "src": self.src, "dst": self.dst,
            "sender_id": self.sender_id, "detail": self.detail, "inner": self.inner,
        }


@dataclass(frozen=True)
class SenderKeys:
    """One source-authenticated group of a ``--sender-keys`` file."""

    dst: str
    mode: str  # "sign" or "sign-batched"
    sender_keys: dict[int, bytes] = field(repr=False)  # key ID -> raw Ed25519 public key
    owners: dict[int, int] = field(default_factory=dict)  # per-sender SA: SPI -> owner's sender ID


def format_sender_keys(groups: Iterable[SenderKeys]) -> str:
    return json.dumps({"source_auth": [
        {"dst": g.dst, "mode": g.mode, "sender_keys": {str(k): v.hex() for k, v in sorted(g.sender_keys.items())},
         "owners": {f"{spi:#010x}": sid for spi, sid in sorted(g.owners.items())}} for g in groups]}, indent=1) + "\n"


def parse_sender_keys_untrusted(text: str, name: str = "sender keys") -> list[SenderKeys]:
    """The ``--sender-keys`` file. Any mistake: one ConfigError naming the file and the entry."""
    def fail(where: str, what: str) -> ConfigError:
        return ConfigError(f"{name}: {where}: {what}")

    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise fail("file", f"not JSON ({exc})") from None
    groups = doc.get("source_auth") if isinstance(doc, dict) else None
    if not isinstance(groups, list):
        raise fail("file", 'needs {"source_auth": [ ... ]}')
    out = []
    for i, g in enumerate(groups):
        where = f"source_auth[{i}]"
        if not isinstance(g, dict) or not isinstance(g.get("dst"), str) or not isinstance(g.get("sender_keys"), dict):
            raise fail(where, 'needs "dst" (an address) and "sender_keys" (a map)')
        mode = g.get("mode", "sign")
        if mode not in ("sign", "sign-batched"):
            raise fail(f"{where}.mode", f"{mode!r} is not one of sign, sign-batched")
        try:
            dst = canonical(g["dst"])
            keys = {int(k, 0): bytes.fromhex(v) for k, v in g["sender_keys"].items()}
            for k in keys.values():
                load_public_key_untrusted(k)
            owners = {int(k, 0): int(v) for k, v in (g.get("owners") or {}).items()}
        except (ValueError, TypeError, AttributeError, GroupSecError) as exc:
            raise fail(where, f"bad address, key ID, public key or owner ({exc})") from None
        out.append(SenderKeys(dst, mode, keys, owners))
    return out


def load_sender_keys(path: str) -> list[SenderKeys]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 22)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read sender keys: {exc}") from None
    return parse_sender_keys_untrusted(text, path)


class Inspector:
    """Pure: feed captured IP packets in order, get one Verdict per ESP/AH packet."""

    def __init__(self, keys: list[uat.KeyEntry], udp_ports: tuple[int, ...] = (),
                 sender_keys: Iterable[SenderKeys] = ()) -> None:
        self.keys = keys
        # per group address: (its SourceAuthenticator, per-sender SA owners)
        self._sauth: dict[str, tuple[SourceAuthenticator, Mapping[int, int]]] = {
            g.dst: (SourceAuthenticator(g.sender_keys, g.mode), g.owners) for g in sender_keys}
        self.udp_ports = {ESP_IN_UDP_PORT, *udp_ports, *(k.udp_encap_port for k in keys if k.udp_encap_port)}
        self._known_spis = {k.spi for k in keys if k.spi is not None and k.protocol == "esp"}
        self._sads: dict[tuple[int, int, str, str | None, int | None], SAD] = {}

    def feed(self, index: int, timestamp: float, ip_packet: bytes) -> Verdict | None:
        """None when the packet is not IPsec (plain UDP, TCP, ICMP, IKE, keepalives)."""
        try:
            info = parse_ip_untrusted(ip_packet)
        except BadPacket as exc:
            return Verdict(index, timestamp, "?", None, None, None, None, None, "malformed", str(exc), None, None)
        if info.proto == PROTO_ESP:
            protocol, core, port = "esp", info.payload, None
        elif info.proto == PROTO_AH:
            protocol, core, port = "ah", info.payload, None
        elif info.proto == PROTO_UDP and info.udp_payload is not None:
            up = info.udp_payload
            try:
                if classify_untrusted(up) != "esp":
                    return None
            except BadPacket:
                return None
            spi0 = int.from_bytes(up[:4], "big")
            if info.dport not in self.udp_ports and spi0 not in self._known_spis:
                return None
            protocol, core, port = "esp-in-udp", up, info.dport
        else:
            return None
        base = dict(index=index, timestamp=timestamp, protocol=protocol, src=info.src, dst=info.dst)
        off = 4 if protocol == "ah" else 0
        if len(core) < off + 8:
            return Verdict(**base, spi=None, seq=None, sender_id=None, verdict="malformed",  # type: ignore[arg-type]
                           detail=f"{protocol.upper()} header truncated", payload=None, inner=None)
        spi = int.from_bytes(core[off:off + 4], "big")
        seq = int.from_bytes(core[off + 4:off + 8], "big")
        ids = dict(spi=spi, seq=seq)
        entry = next((k for k in self.keys if k.matches(spi, info.src, info.dst, "ah" if protocol == "ah" else "esp")),
                     None)
        if entry is None:
            return Verdict(**base, **ids, sender_id=None, verdict="unknown-spi",  # type: ignore[arg-type]
                           detail=f"no SA with SPI {spi:#010x} for {info.dst} in the key file", payload=None, inner=None)
        sender_id = None
        if entry.sender_id_bits and protocol != "ah" and len(core) >= 16:
            sender_id = int.from_bytes(core[8:16], "big") >> (64 - entry.sender_id_bits)
        try:
            sauth = self._sauth.get(info.dst) if protocol == "esp-in-udp" else None
            if sauth is not None:
                # check the sender's signature on P || T, then hand the SA the packet without T
                auth, owners = sauth
                key_id = sender_id if entry.sender_id_bits else owners.get(spi, spi)
                signed = auth.verify_untrusted(core, -1 if key_id is None else key_id)
                ip_packet = build_udp_packet(info.src, info.dst, info.sport or 0, info.dport or 0, bytes(signed))
            sad = self._sad(entry, spi, info.src, info.dst, port, timestamp)
            out, _sa = unprotect_untrusted(sad, ip_packet, timestamp)
            payload, inner = _upper_layer(out)
        except PacketDropped as exc:
            return Verdict(**base, **ids, sender_id=sender_id, verdict=exc.reason,  # type: ignore[arg-type]
                           detail=str(exc), payload=None, inner=None)
        return Verdict(**base, **ids, sender_id=sender_id, verdict="ok", detail="",  # type: ignore[arg-type]
                       payload=payload, inner=inner)

    def _sad(self, entry: uat.KeyEntry, spi: int, src: str, dst: str, port: int | None, now: float) -> SAD:
        key = (entry.line, spi, dst, src if entry.src is not None else None, port)
        sad = self._sads.get(key)
        if sad is None:
            params = entry.sa_params(spi, dst, src=src, mode="transport" if entry.mode is None else None)
            if params.udp_encap_port != port:
                params = replace(params, udp_encap_port=port)
            sad = SAD()
            sad.add(SecurityAssociation(params, "in", now))
            self._sads[key] = sad
        return sad


def _upper_layer(packet: bytes) -> tuple[bytes, str]:
    """The payload a user cares about, and a one-line description of the (inner) packet.
    A transport-mode packet whose next header is IP is a tunnel whose mode the key file did
    not say: unwrap it here."""
    info = parse_ip_untrusted(packet)
    if info.proto in (PROTO_IPIP, PROTO_IPV6):
        info = parse_ip_untrusted(info.payload)
    if info.proto == PROTO_UDP and info.udp_payload is not None:
        return info.udp_payload, f"udp {info.src}:{info.sport} -> {info.dst}:{info.dport}"
    return info.payload, f"proto {info.proto} {info.src} -> {info.dst}"


def inspect_capture(data: bytes, keys: list[uat.KeyEntry], udp_ports: tuple[int, ...] = (),
                    name: str = "capture", sender_keys: Iterable[SenderKeys] = ()) -> list[Verdict]:
    """All verdicts of a capture file's bytes. A malformed file raises ConfigError naming it."""
    insp = Inspector(keys, udp_ports, sender_keys)
    out: list[Verdict] = []
    try:
        for rec in pcap.iter_capture_untrusted(data):
            try:
                ip = pcap.link_payload_untrusted(rec.linktype, rec.data)
            except BadPacket as exc:
                if "unsupported link type" in str(exc):
                    raise
                out.append(Verdict(rec.index, rec.timestamp, "?", None, None, None, None, None, "malformed",
                                   str(exc), None, None))
                continue
            if ip is None:
                continue
            v = insp.feed(rec.index, rec.timestamp, ip)
            if v is not None:
                out.append(v)
    except BadPacket as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return out


# --- the command ------------------------------------------------------------------------------


def _preview(payload: bytes | None) -> str:
    if payload is None:
        return ""
    head = payload[:PREVIEW]
    text = "".join(chr(b) if chr(b) in string.printable and b >= 0x20 else "." for b in head)
    more = "..." if len(payload) > PREVIEW else ""
    return f"{len(payload)}B {head.hex()}{more} |{text}|"


def render(verdicts: list[Verdict]) -> str:
    lines = []
    for v in verdicts:
        spi = f"{v.spi:#010x}" if v.spi is not None else "-"
        sender = (v.src or "-") + (f"#{v.sender_id}" if v.sender_id is not None else "")
        what = _preview(v.payload) if v.verdict == "ok" else v.detail
        lines.append(f"{v.index:>6} {v.protocol:<10} spi={spi} seq={v.seq if v.seq is not None else '-':<8} "
                     f"{sender:>22} -> {v.dst or '-':<16} {v.verdict:<12} {what}")
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no ESP/AH packets"
    lines.append(f"{len(verdicts)} IPsec packets: {summary}")
    return "\n".join(lines)


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="explain every ESP/AH packet of a capture (ok, auth-failed, replay, ...)",
                       description="Decrypt and verify every ESP, AH and ESP-in-UDP packet of a pcap/pcapng "
                       "capture with the SAs of a Wireshark esp_sa key file, and say why each one would be "
                       "accepted or dropped.")
    p.add_argument("capture", metavar="CAPTURE.pcap", help="pcap or pcapng (Ethernet, raw IP, Linux cooked)")
    p.add_argument("--keys", required=True, metavar="ESP_SA_FILE",
                   help="SAs in Wireshark esp_sa UAT format (groupsec demo --keys writes one)")
    p.add_argument("--udp-port", type=int, action="append", default=[], metavar="PORT",
                   help="also treat UDP to PORT as ESP-in-UDP (4500 always is)")
    p.add_argument("--sender-keys", metavar="FILE",
                   help="source_auth groups: senders' public keys (JSON, see docs/PROTOCOL.md); a packet "
                   "its named sender did not sign gets the verdict source-auth-failed")
    p.add_argument("--json", action="store_true", help='print {"packets": [...]} instead of a table')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    keys = uat.load_esp_sa(args.keys)
    sender_keys = load_sender_keys(args.sender_keys) if args.sender_keys else []
    try:
        with open(args.capture, "rb") as f:
            data = f.read(MAX_CAPTURE + 1)
    except OSError as exc:
        raise ConfigError(f"{args.capture}: cannot read capture: {exc.strerror}") from None
    if len(data) > MAX_CAPTURE:
        raise ConfigError(f"{args.capture}: larger than {MAX_CAPTURE >> 30} GiB; split it with editcap -c")
    verdicts = inspect_capture(data, keys, tuple(args.udp_port), name=args.capture, sender_keys=sender_keys)
    if args.json:
        print(json.dumps({"packets": [v.to_json() for v in verdicts]}))
    else:
        print(render(verdicts))
    return 0
