"""Events and per-level state of the member state machine (groupsec.protocol.member).

Split out of member.py to keep each module small; member.py re-exports every name here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from groupsec.ipsec.params import SAParams
from groupsec.ipsec.policy import GroupPolicy
from groupsec.protocol.messages import SAGrant

Key = tuple[str, str]  # (group, level)

MAX_SAS_PER_LEVEL = 256


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class RegisteredEvent(Event):
    member: str
    groups: tuple[Key, ...]


@dataclass(frozen=True)
class InstallChanged(Event):
    """The data path must now hold exactly ``install`` for ``install.policy.key``."""

    install: DesiredInstall


@dataclass(frozen=True)
class GroupRemoved(Event):
    key: Key


@dataclass(frozen=True)
class RekeyApplied(Event):
    key: Key
    msg_id: int
    kek_epoch: int
    kind: str
    source: str  # "multicast", "unicast" or "resync"


@dataclass(frozen=True)
class RekeyRejected(Event):
    reason: str
    source: str
    detail: str = ""


@dataclass(frozen=True)
class ResyncRequested(Event):
    key: Key
    since_msg_id: int
    why: str


@dataclass(frozen=True)
class ControllerError(Event):
    """The controller answered Error or Bye; the session is over."""

    code: str
    message: str


@dataclass(frozen=True)
class KeepaliveTimeout(Event):
    """No Pong in time: the shell should drop the connection and reconnect."""


# --- per group level state ----------------------------------------------------------------


@dataclass
class _SA:
    grant: SAGrant
    installed_at: float  # member time

    @property
    def params(self) -> SAParams:
        return self.grant.params


@dataclass
class LevelState:
    policy: GroupPolicy
    role: str
    sender_id: int | None
    kek_epoch: int
    keks: dict[int, bytes] = field(repr=False)
    msg_id: int
    sas: dict[tuple[int, str], _SA] = field(default_factory=dict)  # (spi, direction)
    sender_keys: dict[int, bytes] = field(default_factory=dict)
    revoked_senders: set[int] = field(default_factory=set)
    owners: dict[int, int] = field(default_factory=dict)  # per-sender SAs: spi -> sender ID
    signing_key: bytes | None = field(default=None, repr=False)  # source auth: our raw Ed25519 key (senders)
    lkh: Any = field(default=None, repr=False)  # key-tree level: our MemberKeyState (member_lkh.py)
    resync_sent_at: float | None = None
    ack_due: float | None = None
    last_heartbeat: float | None = None
    last_heartbeat_time: float = 0.0  # controller time of the newest heartbeat
    last_applied_at: float | None = None

    @property
    def key(self) -> Key:
        return self.policy.key


@dataclass(frozen=True, eq=True)
class DesiredInstall:
    """What the data path must hold for one group level (the shell maps it 1:1 onto
    agent.datapath.base.GroupInstall; groupsec/ never imports agent/)."""

    policy: GroupPolicy
    inbound: tuple[SAParams, ...]
    outbound: SAParams | None
    sender_keys: dict[int, bytes] = field(default_factory=dict, repr=False)
    owners: dict[int, int] = field(default_factory=dict)  # per-sender SAs: spi -> owner's sender ID
    signing_key: bytes | None = field(default=None, repr=False)  # source auth: this sender's key


def _signing_key(v: Any) -> bytes | None:
    """A grant's ``extra["signing_key"]`` (32 raw Ed25519 octets, senders of source-authenticated
    groups only); anything else is ignored (the data path then refuses to send unsigned)."""
    return v if isinstance(v, bytes) and len(v) == 32 else None


def kek_id(kek: bytes) -> str:
    """A short public name for a KEK (to compare members' keys without showing them): the
    first 8 bytes of SHA-256 over a label and the key. Not reversible into the key."""
    return hashlib.sha256(b"groupsec-kek-id\0" + kek).hexdigest()[:16] if kek else ""


def _owners(v: Any) -> dict[int, int]:
    """``[[spi, sender_id], ...]`` (from a grant's or rekey's extra) -> {spi: sender_id}; junk is ignored."""
    out: dict[int, int] = {}
    if isinstance(v, list):
        for item in v[:MAX_SAS_PER_LEVEL * 4]:
            if (isinstance(item, list) and len(item) == 2 and all(type(x) is int for x in item)):
                out[item[0]] = item[1]
    return out
