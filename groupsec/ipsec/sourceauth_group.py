"""One group's (level's) source authentication, shaped for a data path engine.

The engine keeps one ``GroupSourceAuth`` next to its SAD and calls three things:

* ``update(sender_keys, owners, signing_key)`` whenever it applies a new install;
* ``seal(sa, next_header, payload, now) -> list[bytes]`` instead of ``sa.seal_esp``
  (a list: "sign-batched" returns nothing until a window closes, then the whole window),
  plus ``get_timer()`` / ``handle_timer(now)`` / ``flush()`` from its event loop;
* ``opener(sa).open_esp_untrusted(data, now)`` instead of ``sa.open_esp_untrusted``.

Pure: no sockets, no trio. Mode "none" passes everything through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from groupsec.errors import RemoteProtocolError
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sourceauth import (
    DEFAULT_MAX_DELAY,
    DEFAULT_MAX_PACKETS,
    SenderKeys,
    SigningSealer,
    SourceAuthenticator,
    SourceVerifier,
    check_mode,
)


def load_signing_key_untrusted(raw: bytes | Ed25519PrivateKey | None) -> Ed25519PrivateKey | None:
    """A sender's signing key from the 32 raw octets its grant carries."""
    if raw is None or isinstance(raw, Ed25519PrivateKey):
        return raw
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise RemoteProtocolError("a signing key must be 32 octets (raw Ed25519)", "bad-message")
    return Ed25519PrivateKey.from_private_bytes(raw)


class GroupSourceAuth:
    def __init__(self, mode: str, *, signing_key: bytes | Ed25519PrivateKey | None = None,
                 sender_keys: Mapping[int, bytes | Ed25519PublicKey] | None = None,
                 owners: Mapping[int, int] | None = None, max_packets: int = DEFAULT_MAX_PACKETS,
                 max_delay: float = DEFAULT_MAX_DELAY) -> None:
        check_mode(mode)
        self.mode = mode
        self.keys = SenderKeys(sender_keys)
        self.owners: dict[int, int] = dict(owners or {})  # per-sender SA: SPI -> owner's sender ID
        self._signing_key = load_signing_key_untrusted(signing_key)
        self.max_packets, self.max_delay = max_packets, max_delay
        self._auth = SourceAuthenticator(self.keys, mode) if mode != "none" else None
        self._sealer: SigningSealer | None = None
        self._openers: dict[int, tuple[SecurityAssociation, SourceVerifier]] = {}

    def update(self, sender_keys: Mapping[int, bytes | Ed25519PublicKey], owners: Mapping[int, int] | None = None,
               signing_key: bytes | Ed25519PrivateKey | None = None) -> None:
        """Take a new install's keys. Senders missing from ``sender_keys`` are revoked at once."""
        self.keys.replace(sender_keys)
        if owners is not None and dict(owners) != self.owners:
            self.owners = dict(owners)
            self._openers.clear()
        if signing_key is not None:
            key = load_signing_key_untrusted(signing_key)
            if self._signing_key is None or key is None or \
                    key.private_bytes_raw() != self._signing_key.private_bytes_raw():
                self._signing_key = key
                self._sealer = None  # the next seal starts a sealer with the new key (flush first)

    # --- sending -------------------------------------------------------------------------

    @property
    def can_sign(self) -> bool:
        """True once a signing key was given (a sender of a signing group)."""
        return self._signing_key is not None

    def seal(self, sa: SecurityAssociation, next_header: int, payload: bytes, now: float) -> list[bytes]:
        if self.mode == "none":
            return [sa.seal_esp(next_header, payload, now)]
        out: list[bytes] = []
        sealer = self._sealer
        if sealer is None or sealer.sa is not sa:
            if sealer is not None:
                out = sealer.flush()  # the old SA's window goes out before the new SA's packets
            sealer = self._sealer = SigningSealer(sa, self._signing_key, self.mode,
                                                  max_packets=self.max_packets, max_delay=self.max_delay)
        out.extend(sealer.seal_esp(next_header, payload, now))
        return out

    def get_timer(self) -> float | None:
        return self._sealer.get_timer() if self._sealer is not None else None

    def handle_timer(self, now: float) -> list[bytes]:
        return self._sealer.handle_timer(now) if self._sealer is not None else []

    def flush(self) -> list[bytes]:
        return self._sealer.flush() if self._sealer is not None else []

    # --- receiving -----------------------------------------------------------------------

    def opener(self, sa: SecurityAssociation) -> SecurityAssociation | SourceVerifier:
        """What opens this inbound SA's packets: the SA itself, or a verifier around it."""
        if self._auth is None:
            return sa
        spi = sa.params.spi
        cached = self._openers.get(spi)
        if cached is None or cached[0] is not sa:
            cached = (sa, SourceVerifier(sa, self._auth, key_id=self.owners.get(spi)))
            self._openers[spi] = cached
        return cached[1]

    def forget(self, spi: int) -> None:
        self._openers.pop(spi, None)

    def statistics(self) -> dict[str, Any]:
        st: dict[str, Any] = {"mode": self.mode, "senders": self.keys.ids()}
        if self._auth is not None:
            st.update(self._auth.statistics())
        if self._sealer is not None:
            st["sealer"] = self._sealer.statistics()
        return st
