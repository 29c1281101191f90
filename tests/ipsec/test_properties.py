"""hypothesis: the replay window against a set model, untrusted parsers on random and
mutated bytes, and seal/open round trips of payloads up to 65,000 bytes."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ipsec_helpers import V4, V6, pair

from groupsec.errors import BadPacket, GroupSecError, ReplayDetected
from groupsec.ipsec.ip import build_udp_packet, parse_ip_untrusted
from groupsec.ipsec.packet import protect, unprotect_untrusted
from groupsec.ipsec.replay import ReplayWindow
from groupsec.ipsec.suites import ESP_SUITES
from groupsec.ipsec.udpencap import classify_untrusted

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class ModelWindow:
    """The obvious model: remember every accepted number."""

    def __init__(self, size: int) -> None:
        self.size, self.seen, self.top = size, set[int](), 0

    def ok(self, seq: int) -> bool:
        if seq == 0 or seq in self.seen:
            return False
        return seq > self.top or self.top - seq < self.size

    def accept(self, seq: int) -> None:
        self.seen.add(seq)
        self.top = max(self.top, seq)


seqs = st.lists(
    st.one_of(st.integers(0, 200), st.integers(1, 2**32 - 1), st.integers(4000, 4200)), min_size=1, max_size=300
)


@FAST
@given(size=st.sampled_from([32, 33, 63, 64, 65, 1024, 4096]), ops=seqs, verify=st.lists(st.booleans()))
def test_replay_window_matches_model(size: int, ops: list[int], verify: list[bool]) -> None:
    w, m = ReplayWindow(size), ModelWindow(size)
    for i, seq in enumerate(ops):
        ok = m.ok(seq)
        if ok:
            w.check(seq)
            if not verify or verify[i % len(verify)]:  # an ICV that fails never calls accept
                w.accept(seq)
                m.accept(seq)
        else:
            with pytest.raises(ReplayDetected):
                w.check(seq)


@pytest.mark.parametrize("size", [32, 64, 4096])
def test_replay_window_edges(size: int) -> None:
    w = ReplayWindow(size)
    w.check(1)
    w.accept(1)
    w.accept(size + 10)
    for seq in (1, size + 10, 10):  # seen, seen, just left of the window
        with pytest.raises(ReplayDetected):
            w.check(seq)
    w.check(11)  # the oldest number still inside the window
    w.accept(11)
    with pytest.raises(ReplayDetected):
        w.check(11)
    w.check(size + 9)
    w.accept(10**6)  # a big jump clears the window
    w.check(10**6 - size + 1)
    with pytest.raises(ReplayDetected):
        w.check(10**6 - size)


@pytest.mark.parametrize("size", [0, 31, 4097])
def test_replay_window_size_bounds(size: int) -> None:
    with pytest.raises(GroupSecError):
        ReplayWindow(size)


_SAS = {(s, m, af): pair(s, m, V4 if af == "v4" else V6) for s in ESP_SUITES for m in ("transport",)
        for af in ("v4", "v6")}
_SAS_AH = {af: pair("hmac-sha-256-128", "tunnel", V4 if af == "v4" else V6) for af in ("v4", "v6")}


@FAST
@given(data=st.binary(max_size=300), key=st.sampled_from(sorted(_SAS)))
def test_random_bytes_raise_only_our_errors(data: bytes, key: tuple[str, str, str]) -> None:
    _, inb, sad = _SAS[key]
    for fn in (lambda: inb.open_esp_untrusted(data, 0.0), lambda: unprotect_untrusted(sad, data, 0.0),
               lambda: parse_ip_untrusted(data), lambda: classify_untrusted(data)):
        try:
            fn()
        except GroupSecError:
            pass


@FAST
@given(payload=st.binary(max_size=200), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                      min_size=1, max_size=4),
       cut=st.integers(0, 10**6), key=st.sampled_from([*sorted(_SAS), "ah-v4", "ah-v6"]))
def test_mutated_packets_raise_only_our_errors(payload: bytes, edits: list[tuple[int, int]], cut: int,
                                               key: object) -> None:
    if isinstance(key, str):
        out, _, sad = _SAS_AH[key[3:]]
        addrs = V4 if key.endswith("v4") else V6
    else:
        out, _, sad = _SAS[key]  # type: ignore[index]
        addrs = V4 if key[2] == "v4" else V6  # type: ignore[index]
    wire = bytearray(protect(out, build_udp_packet(addrs[0], addrs[1], 1, 2, payload), 0.0))
    for pos, value in edits:
        wire[pos % len(wire)] = value
    for candidate in (bytes(wire), bytes(wire[: cut % (len(wire) + 1)])):
        try:
            unprotect_untrusted(sad, candidate, 0.0)
        except GroupSecError:
            pass


@settings(max_examples=40, deadline=None)
@given(size=st.one_of(st.integers(0, 70), st.integers(0, 65_000)), seed=st.integers(0, 2**32),
       suite=st.sampled_from(ESP_SUITES))
def test_esp_core_round_trip(size: int, seed: int, suite: str) -> None:
    out, inb, _ = _SAS[(suite, "transport", "v4")]
    payload = random.Random(seed).randbytes(size)
    esp = out.seal_esp(17, payload, 0.0)
    assert len(esp) % 4 == 0
    assert inb.open_esp_untrusted(esp, 0.0)[:2] == (17, payload)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 65_000), seed=st.integers(0, 2**32), af=st.sampled_from(["v4", "v6"]),
       suite=st.sampled_from(["aes-gcm-16-128", "aes-cbc-128-hmac-sha-256", "null-hmac-sha-256"]))
def test_whole_packet_round_trip(size: int, seed: int, af: str, suite: str) -> None:
    out, _, sad = _SAS[(suite, "transport", af)]
    addrs = V4 if af == "v4" else V6
    payload = random.Random(seed).randbytes(size)
    pkt = build_udp_packet(addrs[0], addrs[1], 9, 10, payload)
    wire = protect(out, pkt, 0.0)
    assert unprotect_untrusted(sad, wire, 0.0)[0] == pkt


def test_ipv4_total_length_limit_in_whole_packet_mode() -> None:
    out, inb, _ = _SAS[("aes-gcm-16-128", "transport", "v4")]
    pkt = build_udp_packet(*V4, 9, 10, bytes(65_480))  # fits in IPv4, but not once ESP is added
    with pytest.raises(BadPacket):
        protect(out, pkt, 0.0)
    # the ESP core itself has no such limit
    assert inb.open_esp_untrusted(out.seal_esp(17, bytes(65_500), 0.0), 0.0)[1] == bytes(65_500)
