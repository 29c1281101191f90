"""Source-origin authentication (issue 9): forgery, loss, revocation, wire format, latency bound.

The "forger" is a member that holds every group key: it builds its own outbound SA from the
receivers' SA parameters, claims a real sender's ID (or SPI), and signs with a key of its own.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.errors import (
    AuthenticationFailed,
    BadPacket,
    PolicyError,
    RemoteProtocolError,
    ReplayDetected,
    SourceAuthFailed,
)
from groupsec.ipsec import sourceauth as sa_mod
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sourceauth import (
    BatchSigner,
    SenderKeys,
    SigningSealer,
    SourceVerifier,
    check_key_proof_untrusted,
    check_source_auth_datapaths,
    make_key_proof,
    public_key_bytes,
)

GROUP = "239.1.2.3"
NOW = 1000.0
MODES = ("sign", "sign-batched")


def shared_params(sender_id: int | None = None, key: bytes | None = None) -> SAParams:
    return SAParams(spi=0x1000, protocol="esp", suite="aes-gcm-16-128", mode="tunnel", dst=GROUP,
                    enc_key=key or KEY, sender_id_bits=8, sender_id=sender_id)


KEY = os.urandom(20)


class Group:
    """Two genuine senders (IDs 1 and 2) on one shared GCM SA, receivers that know their keys."""

    def __init__(self, mode: str, max_packets: int = 32) -> None:
        self.mode = mode
        self.sk = {1: Ed25519PrivateKey.generate(), 2: Ed25519PrivateKey.generate()}
        self.keys = SenderKeys({i: public_key_bytes(k) for i, k in self.sk.items()})
        self.senders = {i: SigningSealer(SecurityAssociation(shared_params(i), "out", NOW), k, mode,
                                         max_packets=max_packets) for i, k in self.sk.items()}

    def receiver(self) -> SourceVerifier:
        return SourceVerifier(SecurityAssociation(shared_params(), "in", NOW), self.keys, self.mode)

    def send(self, sender: int, payloads: list[bytes], now: float = NOW) -> list[bytes]:
        s = self.senders[sender]
        out = [p for pl in payloads for p in s.seal_esp(17, pl, now)]
        return out + s.flush()


def forger_sealer(mode: str, victim: int, first_seq: int = 1) -> SigningSealer:
    """A receiver with the group key impersonating ``victim`` (its own key, not the victim's)."""
    sa = SecurityAssociation(shared_params(victim), "out", NOW, _test_next_seq=first_seq)
    return SigningSealer(sa, Ed25519PrivateKey.generate(), mode)


def seal_all(s: SigningSealer, payloads: list[bytes]) -> list[bytes]:
    return [p for pl in payloads for p in s.seal_esp(17, pl, NOW)] + s.flush()


@pytest.mark.parametrize("mode", MODES)
def test_genuine_packets_open_to_their_payloads(mode: str) -> None:
    g = Group(mode)
    rx = g.receiver()
    payloads = [os.urandom(random.randrange(0, 1400)) for _ in range(40)]
    for sender in (1, 2):
        got = [rx.open_esp_untrusted(p, NOW) for p in g.send(sender, payloads)]
        assert [(nh, pl, sid) for nh, pl, sid in got] == [(17, p, sender) for p in payloads]
    assert rx.statistics()["verified"] == 80


@pytest.mark.parametrize("mode", MODES)
def test_receiver_with_group_key_cannot_forge(mode: str) -> None:
    g = Group(mode)
    rx1, rx2 = g.receiver(), g.receiver()
    forged = seal_all(forger_sealer(mode, victim=1), [b"open the valve"] * 5)
    for rx in (rx1, rx2):
        for pkt in forged:
            with pytest.raises(SourceAuthFailed) as ei:
                rx.open_esp_untrusted(pkt, NOW)
            assert ei.value.reason == "source-auth-failed"
        assert rx.sa.statistics()["drops"] == {"source-auth-failed": 5}
        assert rx.statistics()["source_auth_failed"] == 5
    # the forged packets carry a valid group ICV: stripped of the trailer, the bare SA opens them
    bare = SecurityAssociation(shared_params(), "in", NOW)
    p, _ = sa_mod.parse_trailer_untrusted(forged[0], mode)
    assert bare.open_esp_untrusted(p, NOW)[1] == b"open the valve"
    # ... and the real sender still gets through, with the sequence numbers the forger used
    real = g.send(1, [b"real %d" % i for i in range(5)])
    for rx in (rx1, rx2):
        assert [rx.open_esp_untrusted(p, NOW)[1] for p in real] == [b"real %d" % i for i in range(5)]


@pytest.mark.parametrize("mode", MODES)
def test_forgery_cannot_push_the_replay_window(mode: str) -> None:
    """A forged packet with a huge sequence number must not move the window past the sender."""
    g = Group(mode)
    rx = g.receiver()
    forged = seal_all(forger_sealer(mode, victim=1, first_seq=0xFFFFFF00), [b"x"])
    with pytest.raises(SourceAuthFailed):
        rx.open_esp_untrusted(forged[0], NOW)
    assert rx.sa.window_for(1).top == 0
    assert rx.open_esp_untrusted(g.send(1, [b"still here"])[0], NOW)[1] == b"still here"


@pytest.mark.parametrize("mode", MODES)
def test_outsider_and_replays_are_still_refused(mode: str) -> None:
    g = Group(mode)
    rx = g.receiver()
    pkts = g.send(1, [b"a", b"b"])
    rx.open_esp_untrusted(pkts[0], NOW)
    with pytest.raises(ReplayDetected):  # replay: refused before any signature work
        rx.open_esp_untrusted(pkts[0], NOW)
    checks = rx.statistics()["signature_checks"]
    # an outsider (other group key) signing with a registered sender's key cannot pass the group ICV
    outsider = SigningSealer(SecurityAssociation(shared_params(2, key=os.urandom(20)), "out", NOW), g.sk[2], mode)
    with pytest.raises(AuthenticationFailed) as ei:
        rx.open_esp_untrusted(seal_all(outsider, [b"z"])[0], NOW)
    assert ei.value.reason == "auth-failed"
    assert rx.statistics()["signature_checks"] == checks + 1
    assert rx.open_esp_untrusted(pkts[1], NOW)[1] == b"b"


def test_batched_forger_reusing_a_genuine_trailer_is_refused() -> None:
    g = Group("sign-batched", max_packets=8)
    rx = g.receiver()
    real = g.send(1, [b"r%d" % i for i in range(8)])
    rx.open_esp_untrusted(real[0], NOW)  # the window is now cached
    forged_p = forger_sealer("sign-batched", victim=1, first_seq=100).sa.seal_esp(17, b"evil", NOW)
    for i in (0, 3, 7):  # the genuine trailer of packet i (signature, path, index) on a forged packet
        p, _ = sa_mod.parse_trailer_untrusted(real[i], "sign-batched")
        for verifier in (rx, g.receiver()):  # cache hit and cache miss
            with pytest.raises(SourceAuthFailed):
                verifier.open_esp_untrusted(forged_p + real[i][len(p):], NOW)
    assert [rx.open_esp_untrusted(p, NOW)[1] for p in real[1:]] == [b"r%d" % i for i in range(1, 8)]


def test_batched_survives_twenty_percent_loss_and_reordering() -> None:
    g = Group("sign-batched")
    rx = g.receiver()
    rng = random.Random(9)
    payloads = [b"%05d" % i + os.urandom(rng.randrange(0, 1000)) for i in range(32 * 20)]
    sent = g.send(1, payloads)
    assert len(sent) == len(payloads)
    kept = [(i, p) for i, p in enumerate(sent) if rng.random() >= 0.2]
    assert 0.7 * len(sent) < len(kept) < 0.9 * len(sent)
    for w in range(20):  # reorder within each window (replay windows of 64 cover it)
        chunk = [k for k in kept if k[0] // 32 == w]
        rng.shuffle(chunk)
        for i, pkt in chunk:
            assert rx.open_esp_untrusted(pkt, NOW)[1] == payloads[i]
    st = rx.statistics()
    windows_seen = len({i // 32 for i, _ in kept})
    assert st["verified"] == len(kept)
    assert st["signature_checks"] == windows_seen  # one signature check per window, not per packet
    assert st["source_auth_failed"] == 0


def test_every_packet_of_a_window_verifies_alone() -> None:
    """The extreme of loss: each packet is the only one of its window a receiver gets."""
    g = Group("sign-batched", max_packets=13)  # not a power of two: empty leaves in the tree
    sent = g.send(2, [b"p%d" % i for i in range(13)])
    for i, pkt in enumerate(sent):
        assert g.receiver().open_esp_untrusted(pkt, NOW)[1] == b"p%d" % i


@pytest.mark.parametrize("mode", MODES)
def test_revocation_rejects_new_packets(mode: str) -> None:
    g = Group(mode, max_packets=4)
    rx = g.receiver()
    before = g.send(1, [b"a", b"b", b"c", b"d"])
    rx.open_esp_untrusted(before[0], NOW)  # window cached (batched)
    g.keys.remove(1)  # what a rekey's revoked_senders does
    for pkt in before[1:] + g.send(1, [b"e"]):
        with pytest.raises(SourceAuthFailed):
            rx.open_esp_untrusted(pkt, NOW)
    assert rx.open_esp_untrusted(g.send(2, [b"other sender"])[0], NOW)[1] == b"other sender"
    # a new key for sender 1 (a re-enrolled device): the old key's signatures stay refused
    new = Ed25519PrivateKey.generate()
    g.keys.replace({1: public_key_bytes(new), 2: public_key_bytes(g.sk[2])})
    with pytest.raises(SourceAuthFailed):
        rx.open_esp_untrusted(g.send(1, [b"old key"])[0], NOW)
    g.senders[1] = SigningSealer(g.senders[1].sa, new, mode, max_packets=4)
    assert rx.open_esp_untrusted(g.send(1, [b"new key"])[0], NOW)[1] == b"new key"


def test_per_sender_sa_uses_the_spi_as_key_id() -> None:
    p = SAParams(spi=0x2222, protocol="esp", suite="aes-cbc-128-hmac-sha-256", mode="transport", dst=GROUP,
                 enc_key=os.urandom(16), auth_key=os.urandom(32))
    owner, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    rx = SourceVerifier(SecurityAssociation(p, "in", NOW), {0x2222: public_key_bytes(owner)}, "sign")
    good = SigningSealer(SecurityAssociation(p, "out", NOW), owner, "sign").seal_esp(17, b"hello", NOW)
    assert rx.open_esp_untrusted(good[0], NOW) == (17, b"hello", 0)
    bad = SigningSealer(SecurityAssociation(p, "out", NOW, _test_next_seq=2), other, "sign").seal_esp(17, b"x", NOW)
    with pytest.raises(SourceAuthFailed):
        rx.open_esp_untrusted(bad[0], NOW)


# --- wire format: checked with an independent re-implementation of the spec ---------------------


def test_sign_wire_format() -> None:
    key = Ed25519PrivateKey.generate()
    sa = SecurityAssociation(shared_params(1), "out", NOW)
    s = SigningSealer(sa, key, "sign")
    pkt = s.seal_esp(17, b"payload", NOW)[0]
    p, sig, kind = pkt[:-65], pkt[-65:-1], pkt[-1]
    assert kind == 0x01
    assert len(sig) == 64
    key.public_key().verify(sig, b"groupsec source-auth v1 sign\x00" + p)
    assert SecurityAssociation(shared_params(), "in", NOW).open_esp_untrusted(p, NOW)[1] == b"payload"


def _spec_root(leaves: list[bytes]) -> bytes:
    level = [hashlib.sha256(b"\x00" + p).digest() for p in leaves]
    while len(level) & (len(level) - 1):
        level.append(bytes(32))
    while len(level) > 1:
        level = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 32])
def test_batch_wire_format(count: int) -> None:
    key = Ed25519PrivateKey.generate()
    signer = BatchSigner(key, max_packets=count)
    ps = [os.urandom(20 + i) for i in range(count)]
    out: list[bytes] = []
    for p in ps:
        out += signer.add(p, NOW)
    assert len(out) == count
    depth = (count - 1).bit_length()
    root = _spec_root(ps)
    for i, (p, pkt) in enumerate(zip(ps, out, strict=True)):
        assert pkt[:len(p)] == p
        t = pkt[len(p):]
        assert len(t) == 32 * depth + 67
        assert (t[-3], t[-2], t[-1]) == (count - 1, i, 0x02)
        key.public_key().verify(t[-67:-3], b"groupsec source-auth v1 batch\x00" + bytes((count - 1,)) + root)
        node = hashlib.sha256(b"\x00" + p).digest()  # the path, from the leaf up, hashes to the root
        for k in range(depth):
            sib = t[32 * k:32 * (k + 1)]
            pair = sib + node if (i >> k) & 1 else node + sib
            node = hashlib.sha256(b"\x01" + pair).digest()
        assert node == root


def test_batch_latency_bound() -> None:
    s = BatchSigner(Ed25519PrivateKey.generate(), max_packets=32, max_delay=0.020)
    assert s.get_timer() is None
    assert s.add(b"x" * 30, 10.0) == []
    assert s.get_timer() == pytest.approx(10.020)
    for t in (10.001, 10.010, 10.015):
        assert s.add(b"y" * 30, t) == []
    assert s.handle_timer(10.0199) == []
    out = s.handle_timer(10.020)
    assert len(out) == 4
    assert s.get_timer() is None
    assert s.pending() == 0
    assert all(pkt[-3] == 3 for pkt in out)  # a window of 4
    # the packet bound: the 32nd packet closes the window at once
    results = [s.add(b"z" * 30, 20.0) for _ in range(32)]
    assert [len(r) for r in results] == [0] * 31 + [32]
    assert s.get_timer() is None


def test_trailer_len_matches_what_is_sent() -> None:
    g = Group("sign-batched", max_packets=32)
    pkt = g.send(1, [b"q"] * 32)[5]
    bare = g.senders[1].sa.seal_esp(17, b"q", NOW)
    assert len(pkt) - len(bare) == sa_mod.trailer_len("sign-batched", 32) == 64 + 3 + 5 * 32
    assert sa_mod.trailer_len("sign") == 65
    assert sa_mod.trailer_len("none") == 0


def test_mode_none_passes_through_and_bad_modes_are_refused() -> None:
    sa = SecurityAssociation(shared_params(1), "out", NOW)
    out = SigningSealer(sa, None, "none").seal_esp(17, b"plain esp", NOW)
    assert SecurityAssociation(shared_params(), "in", NOW).open_esp_untrusted(out[0], NOW)[1] == b"plain esp"
    with pytest.raises(PolicyError):
        SigningSealer(sa, None, "rsa")
    with pytest.raises(TypeError):
        SigningSealer(sa, None, "sign")
    with pytest.raises(PolicyError):
        BatchSigner(Ed25519PrivateKey.generate(), max_packets=257)


# --- controller helpers -----------------------------------------------------------------------


def test_xfrm_members_refuse_source_auth() -> None:
    check_source_auth_datapaths("video", "none", {"a": "xfrm"})
    check_source_auth_datapaths("video", "sign", {"a": "userspace", "b": "userspace"})
    for mode in MODES:
        with pytest.raises(PolicyError, match=r"group video: cam2, cam7 use xfrm, but source_auth .* no signature"):
            check_source_auth_datapaths("video", mode, {"cam7": "xfrm", "cam1": "userspace", "cam2": "xfrm"})


def test_key_proof_of_possession() -> None:
    k = Ed25519PrivateKey.generate()
    raw = public_key_bytes(k)
    proof = make_key_proof(k, "cam1", "video", "hd")
    assert public_key_bytes(check_key_proof_untrusted(raw, proof, "cam1", "video", "hd")) == raw
    for args in (("cam2", "video", "hd"), ("cam1", "audio", "hd"), ("cam1", "video", "")):
        with pytest.raises(RemoteProtocolError) as ei:
            check_key_proof_untrusted(raw, proof, *args)
        assert ei.value.code == "not-authorized"
    with pytest.raises(RemoteProtocolError) as ei:
        check_key_proof_untrusted(raw[:31], proof, "cam1", "video", "hd")
    assert ei.value.code == "bad-message"


def test_sender_keys_table_validates() -> None:
    with pytest.raises(RemoteProtocolError):
        SenderKeys({1: b"short"})
    with pytest.raises(RemoteProtocolError):
        SenderKeys({-1: public_key_bytes(Ed25519PrivateKey.generate())})
    t = SenderKeys()
    k = public_key_bytes(Ed25519PrivateKey.generate())
    t.set(5, k)
    obj = t.get(5)
    t.replace({5: k})
    assert t.get(5) is obj  # unchanged key: same object, verified windows stay cached
    assert repr(t) == "SenderKeys(ids=[5])"


def test_truncated_packets_are_bad_packets() -> None:
    g = Group("sign")
    rx = g.receiver()
    pkt = g.send(1, [b"x"])[0]
    for n in (0, 1, 7, 16, 60, 70):
        with pytest.raises((BadPacket, SourceAuthFailed, AuthenticationFailed)):
            rx.open_esp_untrusted(pkt[:n], NOW)
    with pytest.raises(BadPacket):
        rx.open_esp_untrusted(pkt[:-1] + b"\x02", NOW)  # a batch trailer on a "sign" group



def test_per_sender_sa_keyed_by_owner_sender_id() -> None:
    """With the grant's owners map (SPI -> sender ID), one sender_keys table by sender ID serves
    per-sender SAs too; another sender's key never verifies this SA's packets."""
    p = SAParams(spi=0x4444, protocol="esp", suite="null-hmac-sha-256", mode="transport", dst=GROUP,
                 auth_key=os.urandom(32))
    owner, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = SenderKeys({7: public_key_bytes(owner), 8: public_key_bytes(other)})
    rx = SourceVerifier(SecurityAssociation(p, "in", NOW), keys, "sign-batched", key_id=7)
    bad = SigningSealer(SecurityAssociation(p, "out", NOW, _test_next_seq=5), other, "sign-batched")
    forged = bad.seal_esp(17, b"evil", NOW) + bad.flush()
    with pytest.raises(SourceAuthFailed):
        rx.open_esp_untrusted(forged[0], NOW)
    sealer = SigningSealer(SecurityAssociation(p, "out", NOW), owner, "sign-batched")
    good = sealer.seal_esp(17, b"hi", NOW) + sealer.flush()
    assert rx.open_esp_untrusted(good[0], NOW) == (17, b"hi", 0)
