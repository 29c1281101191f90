"""The receiver checks that `groupsec demo --json` and `groupsec lab --json` summaries share."""

from __future__ import annotations

from typing import Any

RECEIVER_FIELDS = {"name", "received", "lost", "auth_failures", "replays", "evicted", "received_after_eviction"}


def check_receivers(summary: dict[str, Any], rate: int) -> None:
    """Three receivers; the first two kept every packet; the third was evicted half-way: it
    got the first half (and what the old key covered until the rollover), not the rest."""
    assert [r["name"] for r in summary["receivers"]] == ["receiver-1", "receiver-2", "receiver-3"]
    for r in summary["receivers"]:
        assert set(r) == RECEIVER_FIELDS
        assert r["auth_failures"] == 0
        assert r["replays"] == 0
        assert r["received_after_eviction"] == 0
        assert r["lost"] == 0
    kept, evicted = summary["receivers"][:2], summary["receivers"][2]
    for r in kept:
        assert r["evicted"] is False
        assert r["received"] == summary["sent"]
    assert evicted["evicted"] is True
    assert summary["sent"] // 2 - rate <= evicted["received"] < summary["sent"] - rate
