"""The cryptographic transforms of one SA, built once from its keys (creating an AEAD,
cipher or HMAC context is costly, so nothing here is created per packet except what the
``cryptography`` API requires: a CBC context per packet and a copy of the keyed HMAC)."""

from __future__ import annotations

import hmac as _hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as c_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from groupsec.errors import BadPacket
from groupsec.ipsec.suites import Suite

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

# PAD[n] is the RFC 4303 s2.4 default padding of n bytes: 1, 2, 3, ...
PAD = [bytes(range(1, n + 1)) for n in range(256)]


def make_aead(suite: Suite, enc_key: bytes) -> tuple[AESGCM | ChaCha20Poly1305, bytes]:
    """The AEAD object and the 4-byte salt of a GCM/GMAC/ChaCha20 suite."""
    key, salt = enc_key[:-4], enc_key[-4:]
    if suite.name.startswith("chacha20"):
        return ChaCha20Poly1305(key), salt
    return AESGCM(key), salt


class HmacIcv:
    """A truncated HMAC (RFC 4868) keyed once."""

    __slots__ = ("_base", "icv_len")

    def __init__(self, hash_name: str, key: bytes, icv_len: int) -> None:
        self._base = c_hmac.HMAC(key, _HASHES[hash_name]())
        self.icv_len = icv_len

    def compute(self, *parts: bytes | bytearray | memoryview) -> bytes:
        h = self._base.copy()
        for p in parts:
            h.update(p)
        return h.finalize()[: self.icv_len]

    def verify(self, icv: bytes | memoryview, *parts: bytes | bytearray | memoryview) -> bool:
        """Constant-time comparison of ``icv`` with the computed value."""
        return _hmac.compare_digest(self.compute(*parts), bytes(icv))

    def __repr__(self) -> str:
        return f"HmacIcv(icv_len={self.icv_len})"


class CbcCipher:
    """AES-CBC (RFC 3602) with an explicit per-packet IV."""

    __slots__ = ("_alg",)

    def __init__(self, key: bytes) -> None:
        self._alg = algorithms.AES(key)

    def encrypt(self, iv: bytes, data: bytes) -> bytes:
        enc = Cipher(self._alg, modes.CBC(iv)).encryptor()
        return enc.update(data) + enc.finalize()

    def decrypt(self, iv: bytes | memoryview, data: bytes | memoryview) -> bytes:
        if len(data) % 16:
            raise BadPacket("CBC ciphertext is not a multiple of the block size")
        dec = Cipher(self._alg, modes.CBC(bytes(iv))).decryptor()
        return dec.update(data) + dec.finalize()

    def __repr__(self) -> str:
        return "CbcCipher()"
