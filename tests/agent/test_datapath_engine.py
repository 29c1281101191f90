"""GroupEngine without sockets: reconciliation, selectors, and untrusted input."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.datapath.base import GroupInstall
from agent.datapath.bench import static_installs
from agent.datapath.engine import GroupEngine, NotForGroup, PlainEngine, ReceiveOnly
from groupsec.errors import GroupSecError, PacketDropped, PolicyError
from groupsec.ipsec import ip as ipmod

G = "239.1.2.3"
TX, RX = static_installs(G, group="g", port=5004, encap_port=4500)
RAW_TX, RAW_RX = static_installs(G, group="g", port=5004, encap_port=None)


def one(datagrams: list[bytes]) -> bytes:
    """The single datagram a seal without "sign-batched" returns."""
    (data,) = datagrams
    return data


def pair(tx: GroupInstall = TX, rx: GroupInstall = RX, wire: str = "encap") -> tuple[GroupEngine, GroupEngine]:
    return GroupEngine(tx, wire, "10.0.0.1", 0.0), GroupEngine(rx, wire, "10.0.0.2", 0.0)  # type: ignore[arg-type]


def test_seal_open_round_trip_and_selectors() -> None:
    s, r = pair()
    data = one(s.seal_payload(b"hello", 1111, 5004, 1.0))
    pkt, payload = r.open_encap_untrusted(data, "10.0.0.1", 1.0)
    assert bytes(payload) == b"hello"
    info = ipmod.parse_ip_untrusted(pkt)
    assert (info.src, info.dst, info.sport, info.dport) == ("10.0.0.1", G, 1111, 5004)
    # a member that sends to another port of the group is outside the selectors
    data = one(s.seal_payload(b"other port", 1111, 9999, 1.0))
    with pytest.raises(NotForGroup):
        r.open_encap_untrusted(data, "10.0.0.1", 1.0)
    assert r.rx_packets == 1


def test_ipv6_round_trip() -> None:
    tx, rx = static_installs("ff3e::4242", group="g6", port=5004, encap_port=4500)
    s = GroupEngine(tx, "encap", "fd00::1", 0.0)
    r = GroupEngine(rx, "encap", "fd00::2", 0.0)
    pkt, payload = r.open_encap_untrusted(one(s.seal_payload(b"v6", 7, 5004, 1.0)), "fd00::1", 1.0)
    assert bytes(payload) == b"v6"
    assert ipmod.parse_ip_untrusted(pkt).src == "fd00::1"


def test_raw_round_trip_tunnel_and_tun_packets() -> None:
    s, r = pair(RAW_TX, RAW_RX, "raw")
    app_pkt = ipmod.build_udp_packet("10.0.0.1", G, 3333, 5004, b"from an app")
    (wire,) = s.seal_packet(app_pkt, 1.0)
    assert ipmod.parse_ip_untrusted(wire).proto == 50
    inner, payload = r.open_raw_untrusted(wire, 1.0)
    assert inner == app_pkt
    assert bytes(payload) == b"from an app"
    with pytest.raises(NotForGroup):
        s.seal_packet(ipmod.build_udp_packet("10.0.0.1", "239.9.9.9", 3333, 5004, b"x"), 1.0)


def test_receive_only_refuses() -> None:
    r = GroupEngine(RX, "encap", "10.0.0.2", 0.0)
    with pytest.raises(ReceiveOnly):
        one(r.seal_payload(b"x", 1, 5004, 1.0))
    with pytest.raises(ReceiveOnly):
        r.seal_packet(ipmod.build_udp_packet("10.0.0.2", G, 1, 5004, b"x"), 1.0)


def test_apply_keeps_unchanged_sas_and_drops_removed_ones() -> None:
    s, r = pair()
    sa_in = r.inbound[RX.inbound[0].spi]
    for _ in range(3):
        r.open_encap_untrusted(one(s.seal_payload(b"x", 1, 5004, 1.0)), "10.0.0.1", 1.0)
    out = s.outbound
    s.apply(TX, 2.0)
    r.apply(RX, 2.0)
    assert s.outbound is out
    assert r.inbound[RX.inbound[0].spi] is sa_in
    # a replay of an old packet after a no-op apply is still a replay
    old = one(s.seal_payload(b"y", 1, 5004, 1.0))
    r.open_encap_untrusted(old, "10.0.0.1", 1.0)
    with pytest.raises(PacketDropped) as replay:
        r.open_encap_untrusted(old, "10.0.0.1", 1.0)
    assert replay.value.reason == "replay"
    _, new_rx = static_installs(G, group="g", port=5004, encap_port=4500)
    r.apply(new_rx, 3.0)
    assert list(r.inbound) == [new_rx.inbound[0].spi]
    with pytest.raises(PacketDropped) as exc:
        r.open_encap_untrusted(one(s.seal_payload(b"z", 1, 5004, 3.0)), "10.0.0.1", 3.0)
    assert exc.value.reason == "unknown-spi"


def test_source_auth_is_refused_on_the_raw_wire() -> None:
    """The raw ESP wire does not carry signature trailers: refused, never run unverified."""
    from dataclasses import replace

    pol = replace(RAW_TX.policy, source_auth="sign")
    with pytest.raises(PolicyError, match="source_auth 'sign' needs the ESP-in-UDP wire"):
        GroupEngine(GroupInstall(pol, RAW_TX.inbound, RAW_TX.outbound), "raw", "10.0.0.1", 0.0)


ENGINE = GroupEngine(RX, "encap", "10.0.0.2", 0.0)
(GOOD,) = GroupEngine(TX, "encap", "10.0.0.1", 0.0).seal_payload(b"payload" * 10, 1, 5004, 1.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_datagrams_raise_only_drop_errors(data: bytes) -> None:
    with pytest.raises(PacketDropped):
        ENGINE.open_encap_untrusted(data, "10.0.0.1", 5.0)
    with pytest.raises(GroupSecError):
        ENGINE.open_raw_untrusted(data, 5.0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.integers(0, 255))
def test_truncated_or_flipped_packets_are_dropped(cut: int, flip: int) -> None:
    r = GroupEngine(RX, "encap", "10.0.0.2", 0.0)
    with pytest.raises(PacketDropped):
        r.open_encap_untrusted(GOOD[:cut], "10.0.0.1", 1.0)
    if flip:
        bad = bytearray(GOOD)
        bad[cut] ^= flip
        with pytest.raises(PacketDropped):
            r.open_encap_untrusted(bytes(bad), "10.0.0.1", 1.0)
    pkt, _ = r.open_encap_untrusted(GOOD, "10.0.0.1", 1.0)  # the intact one still opens
    assert pkt


def test_plain_engine_is_a_passthrough() -> None:
    e = PlainEngine(TX.policy, "127.0.0.1")
    data = os.urandom(32)
    assert e.seal_payload(data, 1, 2, 0.0) == [data]
    assert e.open_encap_untrusted(data, "127.0.0.1", 0.0) == (data, data)
