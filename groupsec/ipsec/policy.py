"""Group policy: what a member needs to know about a group (or one security level of it)
besides its SAs. The controller builds it from its configuration, the control protocol
carries it, and the data paths turn it into SPD entries, multicast joins and sockets."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from typing import Any, Literal

from groupsec.errors import PolicyError
from groupsec.ipsec.params import MAX_REPLAY_WINDOW, MIN_REPLAY_WINDOW
from groupsec.ipsec.suites import get_suite

SenderPolicy = Literal["shared", "per-sender"]
SourceAuth = Literal["none", "sign", "sign-batched"]


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    group: str
    dst: str  # multicast destination of the data
    protocol: Literal["esp", "ah"] = "esp"
    suite: str = "aes-gcm-16-128"
    mode: Literal["transport", "tunnel"] = "tunnel"
    level: str = ""  # security level within the group ("" for a group with one level)
    src: str | None = None  # SSM source
    ip_proto: int | None = 17  # selector: IP protocol (None = any)
    port: int | None = None  # selector: destination port (None = any)
    replay_window: int = 64
    sender_policy: SenderPolicy = "shared"
    source_auth: SourceAuth = "none"
    udp_encap_port: int | None = 4500  # ESP-in-UDP port for unprivileged data paths; None = raw ESP/AH
    rekey_addr: str | None = None  # multicast rekey channel
    rekey_port: int | None = None
    atd: float = 1.0  # activation time delay (RFC 9838), seconds
    dtd: float = 2.0  # deactivation time delay, seconds
    tek_lifetime: float = 3600.0
    kek_lifetime: float = 86400.0

    def __post_init__(self) -> None:
        try:
            dst = ipaddress.ip_address(self.dst)
        except ValueError as exc:
            raise PolicyError(f"group {self.group}: {exc}") from None
        if not dst.is_multicast:
            raise PolicyError(f"group {self.group}: {self.dst} is not a multicast address")
        get_suite(self.suite, self.protocol)
        if not MIN_REPLAY_WINDOW <= self.replay_window <= MAX_REPLAY_WINDOW:
            raise PolicyError(
                f"group {self.group}: replay window {self.replay_window} is outside "
                f"{MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW}"
            )
        if self.sender_policy not in ("shared", "per-sender"):
            raise PolicyError(f"group {self.group}: sender policy {self.sender_policy!r} is not one of shared, per-sender")
        if self.source_auth not in ("none", "sign", "sign-batched"):
            raise PolicyError(f"group {self.group}: source_auth {self.source_auth!r} is not one of none, sign, sign-batched")

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.level)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupPolicy:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
