"""``groupsec demo``: a short demonstration of the packet engine (until the full
controller/agent demo exists). Seals multicast packets under two group SAs, opens them,
and shows a tampered packet and a replayed packet refused. Exit code 0 only if every
check holds. No key material is printed."""

from __future__ import annotations

import argparse
import os
from typing import Any

from groupsec.errors import AuthenticationFailed, GroupSecError, ReplayDetected
from groupsec.ipsec.ip import build_udp_packet, parse_ip_untrusted
from groupsec.ipsec.packet import protect, unprotect_untrusted
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sad import SAD
from groupsec.ipsec.suites import get_suite


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="demonstrate the ESP/AH packet engine",
                       description="Seal, open, tamper and replay multicast packets with two group SAs.")
    p.set_defaults(func=run)


def _sa(spi: int, suite: str, mode: str, src: str, dst: str, **kw: Any) -> SAParams:
    s = get_suite(suite)
    return SAParams(spi=spi, protocol=s.protocol, suite=suite, mode=mode, src=src, dst=dst,  # type: ignore[arg-type]
                    enc_key=os.urandom(s.enc_key_len), auth_key=os.urandom(s.auth_key_len), group="demo", **kw)


def run(args: argparse.Namespace | None = None) -> int:
    sas = [
        _sa(0x1001, "aes-gcm-16-128", "tunnel", "192.0.2.1", "239.1.1.1", sender_id_bits=8, sender_id=7),
        _sa(0x1002, "hmac-sha-256-128", "transport", "2001:db8::1", "ff0e::1:1"),
    ]
    sad = SAD()
    senders = {p.spi: SecurityAssociation(p, "out", 0.0) for p in sas}
    for p in sas:
        sad.add(SecurityAssociation(p, "in", 0.0))
    checks: list[tuple[str, bool]] = []
    print("groupsec packet engine demo (keys are random and never shown)\n")
    print(f"{'SPI':>8} {'protocol/suite':<24} {'mode':<9} {'group':<12} {'seq':>3} {'plain':>6} {'sealed':>7}  opened")
    wires: list[bytes] = []
    for p in sas:
        for i in range(3):
            payload = f"hello group {p.dst} #{i}".encode() * (i + 1)
            plain = build_udp_packet(p.src or "", p.dst, 5000, 5000, payload)
            wire = protect(senders[p.spi], plain, float(i))
            wires.append(wire)
            restored, sa = unprotect_untrusted(sad, wire, float(i))
            inner = parse_ip_untrusted(restored)
            ok = inner.udp_payload == payload and sa.params.spi == p.spi
            checks.append((f"SPI {p.spi:#x} packet {i} opens to what was sent", ok))
            seq = senders[p.spi].seq
            print(f"{p.spi:#8x} {p.protocol + '/' + p.suite:<24} {p.mode:<9} {p.dst:<12} {seq:>3} {len(plain):>6} "
                  f"{len(wire):>7}  {'ok' if ok else 'WRONG'}")
    # fresh packets (not yet seen by the receiver), one bit flipped in transit
    gcm, ah = sas
    tampered = bytearray(protect(senders[gcm.spi], build_udp_packet(gcm.src or "", gcm.dst, 1, 2, b"pay me"), 5.0))
    tampered[-20] ^= 0x01
    checks.append(("a flipped ciphertext bit is refused", _refused(sad, bytes(tampered), AuthenticationFailed)))
    ah_tampered = bytearray(protect(senders[ah.spi], build_udp_packet(ah.src or "", ah.dst, 1, 2, b"pay me"), 5.0))
    ah_tampered[-1] ^= 0x01
    checks.append(("a flipped payload bit under AH is refused", _refused(sad, bytes(ah_tampered), AuthenticationFailed)))
    checks.append(("a replayed packet is refused", _refused(sad, wires[1], ReplayDetected)))
    print()
    for sa in sad:
        st = sa.statistics()
        print(f"SA {st['spi']:#x} in: packets={st['packets']} bytes={st['bytes']} drops={st['drops']}")
    print()
    for text, ok in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")
    failed = sum(not ok for _, ok in checks)
    print(f"\n{len(checks) - failed}/{len(checks)} checks passed")
    return 0 if failed == 0 else 1


def _refused(sad: SAD, wire: bytes, expected: type[GroupSecError]) -> bool:
    try:
        unprotect_untrusted(sad, wire, 10.0)
    except expected as exc:
        print(f"refused as expected: {type(exc).__name__} ({exc.reason})")
        return True
    except GroupSecError as exc:
        print(f"refused, but with {type(exc).__name__}")
        return False
    return False
