"""Shared helpers for the ipsec tests: building SAs and reading the kernel vectors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from groupsec.ipsec.params import Lifetime, SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sad import SAD
from groupsec.ipsec.suites import SUITES, get_suite

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
KERNEL = VECTORS / "kernel-xfrm"

V4 = ("192.0.2.1", "239.1.2.3")
V6 = ("2001:db8::1", "ff0e::1:2:3")


def make_params(suite: str, mode: str = "tunnel", addrs: tuple[str, str] = V4, spi: int = 0x1000,
                **kw: object) -> SAParams:
    s = get_suite(suite)
    kw.setdefault("enc_key", os.urandom(s.enc_key_len))
    kw.setdefault("auth_key", os.urandom(s.auth_key_len))
    return SAParams(spi=spi, protocol=s.protocol, suite=suite, mode=mode, dst=addrs[1], **kw)  # type: ignore[arg-type]


def pair(suite: str, mode: str = "tunnel", addrs: tuple[str, str] = V4, now: float = 0.0,
         **kw: object) -> tuple[SecurityAssociation, SecurityAssociation, SAD]:
    """An outbound SA, the matching inbound SA, and a SAD holding the inbound one."""
    p = make_params(suite, mode, addrs, **kw)
    out = SecurityAssociation(p, "out", now)
    inb = SecurityAssociation(p, "in", now)
    sad = SAD()
    sad.add(inb)
    return out, inb, sad


def lifetime(**kw: float) -> Lifetime:
    return Lifetime(**kw)  # type: ignore[arg-type]


def kernel_sas() -> dict[str, SAParams]:
    """The kernel vectors' SAs as SAParams (suite chosen by names and key lengths)."""
    out: dict[str, SAParams] = {}
    for sa in json.loads((KERNEL / "sas.json").read_text()):
        enc_key = bytes.fromhex(sa["enc_key"] or "")
        auth_key = bytes.fromhex(sa["auth_key"] or "")
        matches = [
            s for s in SUITES.values()
            if s.protocol == sa["protocol"]
            and s.enc_key_len == len(enc_key) and s.auth_key_len <= len(auth_key)
            and (s.vector_enc or None) == (sa["encryption"] if sa["protocol"] == "esp" else None)
            and (s.vector_integ or None) == sa["integrity"]
        ]
        assert len(matches) == 1, (sa["name"], [m.name for m in matches])
        out[sa["name"]] = SAParams(
            spi=int(sa["spi"], 16), protocol=sa["protocol"], suite=matches[0].name, mode=sa["mode"],
            dst=sa["dst"], src=sa["src"], enc_key=enc_key, auth_key=auth_key, udp_encap_port=sa["udp_encap_port"],
        )
    return out


def read_pcap_ip(path: Path) -> list[bytes]:
    """The IP packets of an Ethernet pcap (classic format, either byte order)."""
    data = path.read_bytes()
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    assert linktype == 1, "expected an Ethernet capture"
    off, packets = 24, []
    while off + 16 <= len(data):
        _ts, _us, incl, _orig = struct.unpack_from(endian + "IIII", data, off)
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype in (0x0800, 0x86DD):
            packets.append(frame[14:])
    return packets
