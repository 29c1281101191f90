"""GroupSourceAuth: the data-path-shaped wrapper (SA rollover, revocation by update, none)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.errors import RemoteProtocolError, SourceAuthFailed
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sourceauth import public_key_bytes
from groupsec.ipsec.sourceauth_group import GroupSourceAuth

NOW = 50.0


def params(spi: int, key: bytes, sender_id: int | None = None) -> SAParams:
    return SAParams(spi=spi, protocol="esp", suite="chacha20-poly1305", mode="tunnel", dst="ff15::77",
                    enc_key=key, sender_id_bits=8, sender_id=sender_id)


def test_rollover_flushes_the_old_window_first_and_both_verify() -> None:
    k1, k2 = os.urandom(36), os.urandom(36)
    sk = Ed25519PrivateKey.generate()
    tx = GroupSourceAuth("sign-batched", signing_key=sk.private_bytes_raw(), max_packets=8)
    rx = GroupSourceAuth("sign-batched", sender_keys={3: public_key_bytes(sk)})
    old_out, new_out = SecurityAssociation(params(0x500, k1, 3), "out", NOW), \
        SecurityAssociation(params(0x501, k2, 3), "out", NOW)
    old_in, new_in = SecurityAssociation(params(0x500, k1), "in", NOW), SecurityAssociation(params(0x501, k2), "in", NOW)
    sent = [p for i in range(3) for p in tx.seal(old_out, 4, b"old %d" % i, NOW)]
    assert sent == []
    assert tx.get_timer() == pytest.approx(NOW + 0.020)
    sent = tx.seal(new_out, 4, b"new 0", NOW + 0.001)  # the SA switched: the old window goes first
    assert len(sent) == 3
    sent += tx.handle_timer(NOW + 0.05)
    assert len(sent) == 4
    got = [rx.opener(old_in if p[:4] == b"\x00\x00\x05\x00" else new_in).open_esp_untrusted(p, NOW)[1]
           for p in sent]
    assert got == [b"old 0", b"old 1", b"old 2", b"new 0"]
    assert rx.statistics()["signature_checks"] == 2


def test_update_revokes_and_none_passes_through() -> None:
    key = os.urandom(36)
    sk = Ed25519PrivateKey.generate()
    tx = GroupSourceAuth("sign", signing_key=sk)
    rx = GroupSourceAuth("sign", sender_keys={3: public_key_bytes(sk)})
    out, inn = SecurityAssociation(params(0x600, key, 3), "out", NOW), SecurityAssociation(params(0x600, key), "in", NOW)
    assert rx.opener(inn).open_esp_untrusted(tx.seal(out, 4, b"a", NOW)[0], NOW)[1] == b"a"
    rx.update({})  # the next install no longer lists sender 3
    with pytest.raises(SourceAuthFailed):
        rx.opener(inn).open_esp_untrusted(tx.seal(out, 4, b"b", NOW)[0], NOW)
    plain = GroupSourceAuth("none")
    assert plain.opener(inn) is inn
    assert plain.seal(out, 4, b"c", NOW)[0][:4] == b"\x00\x00\x06\x00"
    with pytest.raises(RemoteProtocolError):
        GroupSourceAuth("sign", signing_key=b"short")
