"""The transforms groupsec speaks, by name.

A *suite* names everything about an SA's cryptography: the ESP or AH protocol, the
key lengths, the IV and ICV sizes and the padding block. The names are the ones used in
configuration files, in the control protocol and in ``groupsec bench``.

``enc_key_len`` counts the whole key material, including the 4-byte salt of the
counter-mode transforms (RFC 4106 s8.1, RFC 4543 s3.2, RFC 7634 s4): exactly the
``enc_key`` format of Linux XFRM and of the kernel vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from groupsec.errors import PolicyError

Protocol = Literal["esp", "ah"]
Kind = Literal["aead", "gmac", "cbc-hmac", "null-hmac", "hmac"]


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    protocol: Protocol
    kind: Kind
    enc_key_len: int  # bytes, salt included; 0 when there is no cipher
    auth_key_len: int  # bytes of HMAC key; 0 for AEAD/GMAC
    iv_len: int
    icv_len: int
    block: int  # ESP padding alignment (RFC 4303 s2.4)
    counter_mode: bool  # a (key, nonce) pair must never repeat: sender IDs / per-sender SAs
    hash_name: str | None = None  # for HMAC: "sha256", "sha384", "sha512"
    # names for Linux XFRM (algorithm name, ICV/trunc bits)
    xfrm_enc: str | None = None
    xfrm_auth: str | None = None
    # the "encryption"/"integrity" strings of the kernel vectors' sas.json and of Wireshark's esp_sa UAT
    vector_enc: str | None = None
    vector_integ: str | None = None

    @property
    def salt_len(self) -> int:
        return 4 if self.kind in ("aead", "gmac") else 0

    @property
    def encrypts(self) -> bool:
        return self.kind in ("aead", "cbc-hmac")


def _esp(name: str, kind: Kind, enc: int, auth: int, iv: int, icv: int, block: int, **kw: str | None) -> Suite:
    return Suite(name, "esp", kind, enc, auth, iv, icv, block, kind in ("aead", "gmac"), **kw)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        _esp("aes-gcm-16-128", "aead", 20, 0, 8, 16, 4, xfrm_enc="rfc4106(gcm(aes))", vector_enc="aes-gcm-16"),
        _esp("aes-gcm-16-256", "aead", 36, 0, 8, 16, 4, xfrm_enc="rfc4106(gcm(aes))", vector_enc="aes-gcm-16"),
        _esp("chacha20-poly1305", "aead", 36, 0, 8, 16, 4, xfrm_enc="rfc7539esp(chacha20,poly1305)",
             vector_enc="chacha20-poly1305"),
        _esp("aes-gmac-128", "gmac", 20, 0, 8, 16, 4, xfrm_enc="rfc4543(gcm(aes))", vector_enc="null-aes-gmac"),
        _esp("aes-gmac-256", "gmac", 36, 0, 8, 16, 4, xfrm_enc="rfc4543(gcm(aes))", vector_enc="null-aes-gmac"),
        _esp("aes-cbc-128-hmac-sha-256", "cbc-hmac", 16, 32, 16, 16, 16, hash_name="sha256",
             xfrm_enc="cbc(aes)", xfrm_auth="hmac(sha256)", vector_enc="aes-cbc", vector_integ="hmac-sha-256-128"),
        _esp("aes-cbc-256-hmac-sha-256", "cbc-hmac", 32, 32, 16, 16, 16, hash_name="sha256",
             xfrm_enc="cbc(aes)", xfrm_auth="hmac(sha256)", vector_enc="aes-cbc", vector_integ="hmac-sha-256-128"),
        _esp("aes-cbc-256-hmac-sha-512", "cbc-hmac", 32, 64, 16, 32, 16, hash_name="sha512",
             xfrm_enc="cbc(aes)", xfrm_auth="hmac(sha512)", vector_enc="aes-cbc", vector_integ="hmac-sha-512-256"),
        _esp("null-hmac-sha-256", "null-hmac", 0, 32, 0, 16, 4, hash_name="sha256",
             xfrm_enc="ecb(cipher_null)", xfrm_auth="hmac(sha256)", vector_enc="null", vector_integ="hmac-sha-256-128"),
        Suite("hmac-sha-256-128", "ah", "hmac", 0, 32, 0, 16, 4, False, "sha256", xfrm_auth="hmac(sha256)",
              vector_integ="hmac-sha-256-128"),
        Suite("hmac-sha-384-192", "ah", "hmac", 0, 48, 0, 24, 4, False, "sha384", xfrm_auth="hmac(sha384)",
              vector_integ="hmac-sha-384-192"),
        Suite("hmac-sha-512-256", "ah", "hmac", 0, 64, 0, 32, 4, False, "sha512", xfrm_auth="hmac(sha512)",
              vector_integ="hmac-sha-512-256"),
    )
}

ESP_SUITES = tuple(n for n, s in SUITES.items() if s.protocol == "esp")
AH_SUITES = tuple(n for n, s in SUITES.items() if s.protocol == "ah")


def get_suite(name: str, protocol: Protocol | None = None) -> Suite:
    """Look a suite up by name; ``PolicyError`` names the allowed values."""
    suite = SUITES.get(name)
    if suite is None or (protocol is not None and suite.protocol != protocol):
        allowed = ESP_SUITES if protocol == "esp" else AH_SUITES if protocol == "ah" else tuple(SUITES)
        raise PolicyError(f"{name!r} is not one of {', '.join(allowed)}")
    return suite
