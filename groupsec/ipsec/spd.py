"""The security policy database for multicast (RFC 4301 s4.4.1, RFC 5374 s3.2).

Entries are matched in order; the first match decides. ``check_plaintext`` applies the
fail-closed rule to traffic that arrived *without* IPsec: if it matches a PROTECT or a
DISCARD entry it is dropped (``PolicyViolation``) and counted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from groupsec.errors import BadPacket, PolicyError, PolicyViolation
from groupsec.ipsec.ip import IPInfo, canonical


class Action(enum.Enum):
    PROTECT = "protect"
    BYPASS = "bypass"
    DISCARD = "discard"


def _canon(addr: str | None) -> str | None:
    if addr is None:
        return None
    try:
        return canonical(addr)
    except BadPacket:
        raise PolicyError(f"selector: not an IP address: {addr!r}") from None


@dataclass(frozen=True, slots=True)
class Selector:
    """Destination group, optional source (SSM), IP protocol and ports; None = any."""

    dst: str
    src: str | None = None
    proto: int | None = None
    sport: int | None = None
    dport: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dst", _canon(self.dst))
        object.__setattr__(self, "src", _canon(self.src))
        if self.proto is not None and not 0 <= self.proto <= 255:
            raise PolicyError(f"selector protocol {self.proto} is outside 0..255")
        for port in (self.sport, self.dport):
            if port is not None and not 0 <= port <= 65535:
                raise PolicyError(f"selector port {port} is outside 0..65535")

    def matches(self, dst: str, src: str, proto: int, sport: int | None = None, dport: int | None = None) -> bool:
        if dst != self.dst or (self.src is not None and src != self.src):
            return False
        if self.proto is not None and proto != self.proto:
            return False
        if self.sport is not None and sport != self.sport:
            return False
        return self.dport is None or dport == self.dport


@dataclass(frozen=True, slots=True)
class SPDEntry:
    selector: Selector
    action: Action
    group: str = ""
    spis: tuple[int, ...] = field(default=())  # outbound SAs to use for PROTECT (informational)


class SPD:
    def __init__(self) -> None:
        self._entries: list[SPDEntry] = []
        self.drops: dict[str, int] = {}

    def add(self, entry: SPDEntry) -> None:
        self._entries.append(entry)

    def remove_group(self, group: str) -> None:
        self._entries = [e for e in self._entries if e.group != group]

    def match(self, dst: str, src: str, proto: int, sport: int | None = None,
              dport: int | None = None) -> SPDEntry | None:
        for e in self._entries:
            if e.selector.matches(dst, src, proto, sport, dport):
                return e
        return None

    def match_packet(self, info: IPInfo) -> SPDEntry | None:
        return self.match(info.dst, info.src, info.proto, info.sport, info.dport)

    def check_plaintext(self, info: IPInfo) -> SPDEntry | None:
        """Fail closed for traffic that arrived unprotected: PROTECT or DISCARD raises
        ``PolicyViolation`` (counted); BYPASS or no match returns the entry (or None)."""
        e = self.match_packet(info)
        if e is not None and e.action is not Action.BYPASS:
            reason = "unprotected" if e.action is Action.PROTECT else "discard"
            self.drops[reason] = self.drops.get(reason, 0) + 1
            raise PolicyViolation(f"{info.src} -> {info.dst} proto {info.proto}: {reason} by policy")
        return e

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def statistics(self) -> dict[str, object]:
        return {"entries": len(self._entries), "drops": dict(self.drops)}
