"""The contract between the agent's session and a data path (userspace or XFRM).

The session is declarative: whenever its keys change it calls ``apply`` with the whole
desired state of one group (level), and the data path reconciles: it installs the new
inbound SAs, removes the ones no longer listed, and switches the outbound SA. Both
back ends implement this, so rollover logic lives once, in the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from groupsec.ipsec.params import SAParams
from groupsec.ipsec.policy import GroupPolicy


@dataclass(frozen=True)
class GroupInstall:
    policy: GroupPolicy
    inbound: tuple[SAParams, ...] = ()  # every SA this member may receive under
    outbound: SAParams | None = None  # the SA this member sends with now (None: receive-only)
    sender_keys: dict[int, bytes] = field(default_factory=dict)  # source auth: sender ID/SPI -> Ed25519 public key
    owners: dict[int, int] = field(default_factory=dict)  # source auth, per-sender SAs: SPI -> owner's sender ID
    signing_key: bytes | None = field(default=None, repr=False)  # source auth: this sender's raw Ed25519 key


class Datapath(Protocol):
    def apply(self, install: GroupInstall) -> None:
        """Make the data path's state for ``install.policy.key`` exactly this."""

    def remove_group(self, key: tuple[str, str]) -> None:
        """Forget a group (level) entirely: its SAs, policies and joins."""

    def statistics(self) -> dict[str, Any]:
        """Counters: per SA (packets, bytes, drops by reason) and totals."""
