"""SA parameters: the immutable description of one security association.

This is the one type that the controller creates, the control protocol carries, the
userspace engine (``groupsec.ipsec.sa``) runs and the XFRM data path installs. It
validates itself on construction and refuses the unsafe configurations of DESIGN.md s5.
Its ``repr`` never shows key material.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

from groupsec.errors import PolicyError
from groupsec.ipsec.suites import Suite, get_suite

Mode = Literal["transport", "tunnel"]
Direction = Literal["in", "out"]

MIN_REPLAY_WINDOW = 32
MAX_REPLAY_WINDOW = 4096
MAX_SENDER_ID_BITS = 16  # RFC 6054 / RFC 9838: the sender ID takes the IV's top bits


@dataclass(frozen=True, slots=True)
class Lifetime:
    """Soft and hard limits. 0 means "no limit". Seconds count from the SA's installation."""

    soft_packets: int = 0
    hard_packets: int = 0
    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_seconds: float = 0.0
    hard_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("packets", "bytes", "seconds"):
            soft, hard = getattr(self, "soft_" + name), getattr(self, "hard_" + name)
            if soft < 0 or hard < 0:
                raise PolicyError(f"lifetime {name} must not be negative")
            if soft and hard and soft > hard:
                raise PolicyError(f"soft {name} lifetime {soft} is above the hard one {hard}")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lifetime:
        return cls(**{k: d[k] for k in cls.__slots__ if k in d})


@dataclass(frozen=True, slots=True)
class SAParams:
    """One SA. ``dst`` is the multicast group address; ``src`` the sender's address (for
    SSM lookup, tunnel address preservation, and per-sender SAs), or None for any source.

    ``sender_id_bits`` > 0 marks a counter-mode SA shared by several senders: the top
    ``sender_id_bits`` bits of the 64-bit IV carry ``sender_id`` (RFC 6054), so no two
    senders ever use one nonce. A receiver keeps one replay window per sender ID.
    """

    spi: int
    protocol: Literal["esp", "ah"]
    suite: str
    mode: Mode
    dst: str
    enc_key: bytes = field(default=b"", repr=False)
    auth_key: bytes = field(default=b"", repr=False)
    src: str | None = None
    replay_window: int = 64
    sender_id_bits: int = 0
    sender_id: int | None = None  # set on an outbound SA that is shared (sender_id_bits > 0)
    udp_encap_port: int | None = None  # RFC 3948 ESP-in-UDP destination port, or None
    ah_align4: bool = False  # IPv4 AH: pad the ICV to 32 bits (RFC 4302) instead of Linux's 64
    esn: bool = False
    lifetime: Lifetime = field(default_factory=Lifetime)
    group: str = ""  # the group (and level) this SA belongs to, for display and counters
    level: str = ""

    def __post_init__(self) -> None:
        if not 256 <= self.spi <= 0xFFFFFFFF:
            raise PolicyError(f"SPI {self.spi} is outside 256..2^32-1 (0-255 are reserved)")
        suite = get_suite(self.suite, self.protocol)
        if self.mode not in ("transport", "tunnel"):
            raise PolicyError(f"mode {self.mode!r} is not one of transport, tunnel")
        try:
            dst = ipaddress.ip_address(self.dst)
            src = ipaddress.ip_address(self.src) if self.src is not None else None
        except ValueError as exc:
            raise PolicyError(f"bad SA address: {exc}") from None
        if src is not None and src.version != dst.version:
            raise PolicyError("SA source and destination are of different IP versions")
        if self.esn and dst.is_multicast:
            raise PolicyError("ESN is not allowed on a multicast SA (RFC 9838)")
        if self.esn:
            raise PolicyError("ESN is not supported")
        if len(self.enc_key) != suite.enc_key_len:
            raise PolicyError(f"{suite.name}: encryption key must be {suite.enc_key_len} bytes, got {len(self.enc_key)}")
        # RFC 4868 keys are exactly the hash output; HMAC (RFC 2104) and Linux also take longer keys up to
        # the hash block size (the kernel vectors use a 64-byte key for HMAC-SHA-384-192), so accept those.
        max_auth = {"sha256": 64, "sha384": 128, "sha512": 128}.get(suite.hash_name or "", suite.auth_key_len)
        if not suite.auth_key_len <= len(self.auth_key) <= max(max_auth, suite.auth_key_len) or (
            suite.auth_key_len == 0 and self.auth_key
        ):
            raise PolicyError(f"{suite.name}: integrity key must be {suite.auth_key_len} bytes, got {len(self.auth_key)}")
        if suite.protocol == "esp" and suite.icv_len == 0:
            raise PolicyError("encryption-only ESP is refused: use an AEAD or an integrity transform")
        if not MIN_REPLAY_WINDOW <= self.replay_window <= MAX_REPLAY_WINDOW:
            raise PolicyError(
                f"replay window {self.replay_window} is outside {MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW}"
                " (a window of 0 is refused)"
            )
        if not 0 <= self.sender_id_bits <= MAX_SENDER_ID_BITS:
            raise PolicyError(f"sender_id_bits must be 0..{MAX_SENDER_ID_BITS}")
        if self.sender_id_bits and not suite.counter_mode:
            raise PolicyError(f"{suite.name} is not a counter-mode suite: sender IDs do not apply")
        if self.sender_id is not None:
            if not self.sender_id_bits:
                raise PolicyError("a sender ID needs sender_id_bits > 0")
            if not 0 < self.sender_id < (1 << self.sender_id_bits):
                raise PolicyError(f"sender ID {self.sender_id} does not fit in {self.sender_id_bits} bits (0 is reserved)")
        if self.udp_encap_port is not None and (self.protocol != "esp" or not 0 < self.udp_encap_port < 65536):
            raise PolicyError("UDP encapsulation applies to ESP only, with a port in 1..65535")

    @property
    def suite_obj(self) -> Suite:
        return get_suite(self.suite)

    @property
    def ip_version(self) -> int:
        return ipaddress.ip_address(self.dst).version

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (for msgpack and the store). Contains key material: never log it."""
        d = {k: getattr(self, k) for k in self.__slots__ if k != "lifetime"}
        d["lifetime"] = self.lifetime.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAParams:
        kw = {k: d[k] for k in cls.__slots__ if k in d and k != "lifetime"}
        kw["lifetime"] = Lifetime.from_dict(d.get("lifetime") or {})
        return cls(**kw)


def check_no_shared_counter_key(sas: list[SAParams]) -> None:
    """Refuse one key on two counter-mode SAs (the nonce spaces would collide)."""
    seen: dict[bytes, int] = {}
    for sa in sas:
        if sa.suite_obj.counter_mode:
            other = seen.setdefault(sa.enc_key, sa.spi)
            if other != sa.spi:
                raise PolicyError(f"SAs {other:#x} and {sa.spi:#x} share one counter-mode key")
