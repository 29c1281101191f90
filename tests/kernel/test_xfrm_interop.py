"""Interop with the Linux kernel's IPsec, both ways, on real packets between two namespaces.

* kernel -> userspace: a plain UDP socket in namespace A sends multicast; our XFRM SAs and
  policies make the kernel seal it; we capture the packets on B's veth and our engine
  (groupsec.ipsec) opens them.
* userspace -> kernel: our engine seals; we inject the packets on A's veth; the kernel in
  B (our XFRM SAs and policies) opens them and a plain UDP socket receives the plaintext.
  Tampered, replayed and unprotected packets are not delivered, and the kernel's counters
  say why.

Runs inside the VM only (tests/kernel/run_in_vm.py); on the host the module skips.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import struct
import time

import pytest
from kernel_net import (
    ADDR,
    GROUP,
    IN_VM,
    PORT,
    SKIP_REASON,
    A,
    B,
    Capture,
    Injector,
    datapath,
    is_ipsec,
    make_policy,
    make_sa,
    recv_all,
    udp_receiver,
    udp_sender,
    xfrm_stat,
)

if not IN_VM:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from agent.datapath.base import GroupInstall
from groupsec.ipsec.ip import addr_to_bytes, build_udp_packet, parse_ip_untrusted, udp_checksum
from groupsec.ipsec.packet import protect, unprotect_untrusted
from groupsec.ipsec.params import Lifetime
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sad import SAD

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("topology")]

SUITES = ["aes-gcm-16-128", "chacha20-poly1305", "aes-cbc-128-hmac-sha-256", "hmac-sha-256-128"]
MATRIX = [(s, m, v, None, False) for s in SUITES for m in ("transport", "tunnel") for v in (4, 6)]
EXTRA = [  # ESP-in-UDP (RFC 3948) and IPv4 AH with 32-bit alignment (XFRM_STATE_ALIGN4)
    ("aes-gcm-16-128", "transport", 4, 4500, False),
    ("aes-gcm-16-128", "tunnel", 6, 4500, False),
    ("aes-cbc-128-hmac-sha-256", "tunnel", 4, 4500, False),
    ("hmac-sha-256-128", "transport", 4, None, True),
    ("hmac-sha-256-128", "tunnel", 4, None, True),
]
CASES = MATRIX + EXTRA
IDS = [f"{s}-{m}-v{v}" + ("-udp" if e else "") + ("-align4" if a else "") for s, m, v, e, a in CASES]
PAYLOADS = [b"\x01", b"fifteen bytes!!", bytes(range(200))]


@pytest.fixture
def dp_a():
    d = datapath(A)
    yield d
    d.close()


@pytest.fixture
def dp_b():
    d = datapath(B)
    yield d
    d.close()


def _same(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def _flip_last_byte(pkt: bytes) -> bytes:
    """Corrupt the ICV; for ESP-in-UDP fix the UDP checksum, so that ESP (not UDP) sees it."""
    b = bytearray(pkt)
    b[-1] ^= 0x01
    info = parse_ip_untrusted(pkt)
    if info.proto == 17:
        off = info.header_len
        b[off + 6:off + 8] = bytes(2)
        csum = udp_checksum(addr_to_bytes(info.src), addr_to_bytes(info.dst), b[off:])
        b[off + 6:off + 8] = struct.pack("!H", csum)
    return bytes(b)


@pytest.mark.parametrize(("suite", "mode", "version", "encap", "align4"), CASES, ids=IDS)
def test_kernel_seals_userspace_opens(dp_a, suite, mode, version, encap, align4):
    src, group = ADDR[A][version], GROUP[version]
    params = make_sa(suite, mode, version, src=src, udp_encap_port=encap, ah_align4=align4)
    dp_a.apply(GroupInstall(make_policy(suite, mode, version, udp_encap_port=encap), outbound=params))
    cap = Capture(B)
    tx = udp_sender(A, version)
    try:
        for p in PAYLOADS:
            tx.sendto(p, (group, PORT))
        pkts = cap.packets(len(PAYLOADS), keep=is_ipsec)
    finally:
        tx.close()
        cap.close()
    assert len(pkts) == len(PAYLOADS), "the kernel did not send one IPsec packet per datagram"
    now = time.monotonic()
    sad = SAD()
    sad.add(SecurityAssociation(params, "in", now))
    opened = []
    for pkt in pkts:
        outer = parse_ip_untrusted(pkt)
        # transport: the sender's addresses; tunnel: address preservation (RFC 5374)
        assert _same(outer.src, src)
        assert _same(outer.dst, group)
        assert outer.proto == (17 if encap else 50 if params.protocol == "esp" else 51)
        if params.suite_obj.encrypts:
            assert bytes(range(100, 200)) not in pkt
        inner_pkt, sa = unprotect_untrusted(sad, pkt, now)
        inner = parse_ip_untrusted(inner_pkt)
        opened.append(inner.udp_payload)
        assert inner.dport == PORT
        assert _same(inner.src, src)
        assert _same(inner.dst, group)
        assert sa.params.spi == params.spi
    assert sorted(opened) == sorted(PAYLOADS)  # (UDP keeps no order)
    (st,) = dp_a.statistics()["sas"]
    assert (st["spi"], st["direction"], st["packets"]) == (params.spi, "out", len(PAYLOADS))


@pytest.mark.parametrize(("suite", "mode", "version", "encap", "align4"), CASES, ids=IDS)
def test_userspace_seals_kernel_opens(dp_b, suite, mode, version, encap, align4):
    src, group = ADDR[A][version], GROUP[version]
    params = make_sa(suite, mode, version, src=src, udp_encap_port=encap, ah_align4=align4)
    dp_b.apply(GroupInstall(make_policy(suite, mode, version, udp_encap_port=encap), inbound=(params,)))
    rx = udp_receiver(B, version, PORT)
    inj = Injector(A)
    now = time.monotonic()
    out = SecurityAssociation(params, "out", now)

    def seal(payload: bytes) -> bytes:
        return protect(out, build_udp_packet(src, group, 40000, PORT, payload, ttl=8), now)

    try:
        sealed = [seal(p) for p in PAYLOADS]
        for pkt in sealed:
            assert is_ipsec(pkt)
            inj.send(pkt, group)
        got = recv_all(rx, len(PAYLOADS))
        # (UDP keeps no order: the first packet may wait for the kernel's crypto to be set up)
        assert sorted(d for d, _ in got) == sorted(PAYLOADS), "the kernel did not deliver what our engine sealed"
        assert all(_same(a, src) for _, a in got)

        before = xfrm_stat(B)
        inj.send(_flip_last_byte(seal(b"tampered")), group)  # ICV fails
        inj.send(sealed[0], group)  # replay
        inj.send(build_udp_packet(src, group, 40000, PORT, b"plaintext"), group)  # unprotected: fail closed
        assert recv_all(rx, 1, timeout=1.0) == [], "a tampered, replayed or unprotected packet was delivered"
        after = xfrm_stat(B)
    finally:
        rx.close()
        inj.close()
    (st,) = dp_b.statistics()["sas"]
    assert st["packets"] == len(PAYLOADS)
    assert st["drops"] == {"replay": 1, "auth-failed": 1}
    assert after["XfrmInTmplMismatch"] + after["XfrmInNoPols"] > before["XfrmInTmplMismatch"] + before["XfrmInNoPols"]


def test_hard_packet_lifetime_stops_the_kernel_sender(dp_a):
    src, group = ADDR[A][4], GROUP[4]
    params = make_sa("aes-gcm-16-128", "tunnel", 4, src=src, lifetime=Lifetime(soft_packets=2, hard_packets=3))
    dp_a.apply(GroupInstall(make_policy("aes-gcm-16-128", "tunnel", 4), outbound=params))
    cap = Capture(B)
    tx = udp_sender(A, 4)
    try:
        for i in range(6):
            try:
                tx.sendto(b"x%d" % i, (group, PORT))
            except OSError:
                pass  # the kernel may refuse once the SA is gone (no SA for the policy's template)
        pkts = cap.packets(6, timeout=2.0, keep=is_ipsec)
    finally:
        tx.close()
        cap.close()
    assert len(pkts) == 3
    assert dp_a.statistics()["sas"] == []  # the kernel deleted the SA at its hard limit


def test_receive_only_member_cannot_send_plaintext(dp_a):
    """A member without an outbound SA: the blocking policy stops its plaintext (fail closed)."""
    params = make_sa("aes-gcm-16-128", "transport", 4)
    dp_a.apply(GroupInstall(make_policy("aes-gcm-16-128", "transport", 4), inbound=(params,)))
    cap = Capture(B)
    tx = udp_sender(A, 4)
    try:
        with pytest.raises(PermissionError):
            tx.sendto(b"secret", (GROUP[4], PORT))
        assert cap.packets(1, timeout=1.0, keep=lambda p: b"secret" in p) == []
    finally:
        tx.close()
        cap.close()


def test_rollover_through_the_kernel_loses_nothing(dp_a, dp_b):
    """Kernel to kernel: add the new SA at the receiver, switch the sender, drop the old one,
    while packets flow; every packet arrives."""
    src, group = ADDR[A][4], GROUP[4]
    policy = make_policy("aes-gcm-16-128", "tunnel", 4)
    sas = [make_sa("aes-gcm-16-128", "tunnel", 4, src=src) for _ in range(3)]
    rx = udp_receiver(B, 4, PORT)
    tx = udp_sender(A, 4)
    sent = 0
    try:
        dp_b.apply(GroupInstall(policy, inbound=(sas[0],)))
        dp_a.apply(GroupInstall(policy, outbound=sas[0]))

        def burst(n: int = 5) -> None:
            nonlocal sent
            for _ in range(n):
                tx.sendto(os.urandom(8) + b"%06d" % sent, (group, PORT))
                sent += 1

        burst()
        for old, new in itertools.pairwise(sas):
            dp_b.apply(GroupInstall(policy, inbound=(old, new)))  # before activation
            burst()
            dp_a.apply(GroupInstall(policy, outbound=new))  # activation
            burst()
            time.sleep(0.2)  # the deactivation time delay (DTD): packets in flight under the old SA land
            dp_b.apply(GroupInstall(policy, inbound=(new,)))  # after deactivation
            burst()
        got = recv_all(rx, sent, timeout=3.0)
    finally:
        rx.close()
        tx.close()
    assert sorted(int(d[8:]) for d, _ in got) == list(range(sent))
    (st,) = dp_b.statistics()["sas"]
    assert st["spi"] == sas[-1].spi
