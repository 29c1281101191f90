"""The security association database (RFC 4301 s4.4.2, RFC 5374 s3.1).

Inbound multicast SAs are found by (SPI, destination group), and optionally by source
as well (SSM, per-sender SAs). A source-specific entry wins over an any-source one.
"""

from __future__ import annotations

from collections.abc import Iterator

from groupsec.errors import BadPacket, PolicyError, UnknownSPI
from groupsec.ipsec.ip import canonical
from groupsec.ipsec.sa import SecurityAssociation


def _canon(addr: str) -> str:
    try:
        return canonical(addr)
    except BadPacket:
        raise PolicyError(f"not an IP address: {addr!r}") from None


class SAD:
    def __init__(self) -> None:
        self._by_key: dict[tuple[int, str, str | None], SecurityAssociation] = {}
        self.drops: dict[str, int] = {}  # drops before an SA is known (unknown SPI, malformed outer header)

    def add(self, sa: SecurityAssociation) -> None:
        p = sa.params
        key = (p.spi, _canon(p.dst), _canon(p.src) if p.src is not None else None)
        if key in self._by_key:
            raise PolicyError(f"an SA with SPI {p.spi:#x} for {p.dst} (source {p.src or 'any'}) already exists")
        self._by_key[key] = sa

    def remove(self, spi: int, dst: str, src: str | None = None) -> None:
        """Remove the SA(s) with this SPI and destination (only the one for ``src`` if given)."""
        d = _canon(dst)
        keys = [k for k in self._by_key if k[0] == spi and k[1] == d and (src is None or k[2] == _canon(src))]
        if not keys:
            raise UnknownSPI(f"no SA with SPI {spi:#x} for {dst}")
        for k in keys:
            del self._by_key[k]

    def lookup(self, spi: int, dst: str, src: str | None = None) -> SecurityAssociation:
        """Find the SA; the source-specific entry wins. Raises ``UnknownSPI`` (counted)."""
        by = self._by_key
        if src is not None:
            sa = by.get((spi, dst, src))
            if sa is not None:
                return sa
        sa = by.get((spi, dst, None))
        if sa is not None:
            return sa
        try:  # maybe not in canonical form
            d, s = canonical(dst), canonical(src) if src is not None else None
        except BadPacket:
            d, s = dst, src
        if (d, s) != (dst, src):
            sa = by.get((spi, d, s)) if s is not None else None
            sa = sa or by.get((spi, d, None))
            if sa is not None:
                return sa
        self.count_drop(UnknownSPI.reason)
        raise UnknownSPI(f"no SA with SPI {spi:#x} for {dst}")

    def __iter__(self) -> Iterator[SecurityAssociation]:
        return iter(list(self._by_key.values()))

    def __len__(self) -> int:
        return len(self._by_key)

    def count_drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def statistics(self) -> dict[str, object]:
        return {"sas": len(self._by_key), "drops": dict(self.drops)}
