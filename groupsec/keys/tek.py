"""TEK and KEK generation (pure). Keys come from os.urandom only."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

from groupsec.ipsec.params import Lifetime, SAParams
from groupsec.ipsec.policy import GroupPolicy
from groupsec.ipsec.suites import get_suite

KEK_LEN = 32
MIN_SPI = 256


def new_kek() -> bytes:
    return os.urandom(KEK_LEN)


def random_spi(taken: Callable[[int], bool]) -> int:
    """A random SPI in 256..2^32-1 for which ``taken(spi)`` is False."""
    for _ in range(1000):
        spi = MIN_SPI + secrets.randbelow(0xFFFFFFFF - MIN_SPI + 1)
        if not taken(spi):
            return spi
    raise RuntimeError("SPI space exhausted")  # pragma: no cover - 2^32 space


def new_sa(policy: GroupPolicy, spi: int, sender_id_bits: int, hard_seconds: float) -> SAParams:
    """A fresh SA for the group (level) ``policy`` with new random keys."""
    suite = get_suite(policy.suite, policy.protocol)
    return SAParams(spi=spi, protocol=policy.protocol, suite=policy.suite, mode=policy.mode, dst=policy.dst,
                    enc_key=os.urandom(suite.enc_key_len), auth_key=os.urandom(suite.auth_key_len),
                    src=policy.src, replay_window=policy.replay_window, sender_id_bits=sender_id_bits,
                    udp_encap_port=policy.udp_encap_port if policy.protocol == "esp" else None,
                    lifetime=Lifetime(hard_seconds=hard_seconds), group=policy.group, level=policy.level)
