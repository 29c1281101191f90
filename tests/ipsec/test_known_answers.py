"""Published known-answer vectors, run in both directions where that makes sense."""

from __future__ import annotations

import json

import pytest
from ipsec_helpers import VECTORS

from groupsec.errors import AuthenticationFailed
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.transforms import HmacIcv

GCM = json.loads((VECTORS / "esp-aes-gcm-draft-mcgrew-gcm-test-01.json").read_text())
HMAC = json.loads((VECTORS / "hmac-sha2-rfc4868.json").read_text())


def _gcm_params(case: dict[str, str]) -> tuple[SAParams, bytes]:
    key = bytes.fromhex(case["key"]) + bytes.fromhex(case["salt"])
    suite = "aes-gcm-16-128" if len(key) == 20 else "aes-gcm-16-256"
    p = SAParams(spi=int(case["spi"], 16), protocol="esp", suite=suite, mode="tunnel", dst="239.0.0.1", enc_key=key)
    esp = bytes.fromhex(case["spi"] + case["seq"] + case["iv"] + case["ciphertext"])
    return p, esp


@pytest.mark.parametrize("case", GCM["cases"], ids=lambda c: c["name"])
def test_gcm_vector_opens(case: dict[str, str]) -> None:
    p, esp = _gcm_params(case)
    sa = SecurityAssociation(p, "in", 0.0)
    nh, payload, sender = sa.open_esp_untrusted(esp, 0.0)
    pt = bytes.fromhex(case["plaintext"])
    assert (nh, payload, sender) == (pt[-1], pt[: len(pt) - 2 - pt[-2]], 0)
    bad = bytearray(esp)
    bad[-5] ^= 1
    with pytest.raises(AuthenticationFailed):
        SecurityAssociation(p, "in", 0.0).open_esp_untrusted(bytes(bad), 0.0)


@pytest.mark.parametrize("case", GCM["cases"], ids=lambda c: c["name"])
def test_gcm_vector_seals_to_the_same_bytes(case: dict[str, str]) -> None:
    p, esp = _gcm_params(case)
    pt = bytes.fromhex(case["plaintext"])
    nh, padlen = pt[-1], pt[-2]
    payload = pt[: len(pt) - 2 - padlen]
    assert padlen == (-len(payload) - 2) % 4  # the vectors use the default (minimal) padding
    iv = bytes.fromhex(case["iv"])
    sa = SecurityAssociation(p, "out", 0.0, _test_iv_source=lambda seq: iv, _test_next_seq=int(case["seq"], 16))
    assert sa.seal_esp(nh, payload, 0.0) == esp


@pytest.mark.parametrize("case", HMAC["cases"], ids=lambda c: c["name"])
def test_rfc4868_icv(case: dict[str, str]) -> None:
    icv_len = {"sha256": 16, "sha384": 24, "sha512": 32}[case["hash"]]
    key, data = bytes.fromhex(case["key"]), bytes.fromhex(case["data"])
    expected = bytes.fromhex(case["hmac"])[:icv_len]
    suite = {"sha256": "hmac-sha-256-128", "sha384": "hmac-sha-384-192", "sha512": "hmac-sha-512-256"}[case["hash"]]
    sa = SecurityAssociation(
        SAParams(spi=0x100, protocol="ah", suite=suite, mode="transport", dst="239.0.0.1", auth_key=key), "out", 0.0
    )
    icv: HmacIcv = sa.icv()
    assert icv.compute(data) == expected
    assert icv.compute(data[:3], data[3:]) == expected  # parts are concatenated
    assert icv.verify(expected, data)
    assert not icv.verify(bytes([expected[0] ^ 1]) + expected[1:], data)
