"""`groupsec lab --datapath xfrm`: a member's drops come from its XFRM data path statistics in
the shape the demo's summary reads (the kernel's per-namespace counters or the per-SA ones,
whichever counted more: an SA deleted at rollover takes its own counters with it)."""

from __future__ import annotations

from groupsec.lab import xfrm_drops


def test_kernel_counters_outlive_deleted_sas() -> None:
    stats = {"datapath": "xfrm", "groups": 1, "sas": [],
             "totals": {"packets": 10, "bytes": 0, "drops": {"replay": 1, "auth-failed": 0}},
             "kernel": {"XfrmInStateProtoError": 3, "XfrmInNoStates": 7}}
    assert xfrm_drops(stats) == {"auth-failed": 3, "replay": 1}


def test_a_clean_member_has_no_drops() -> None:
    assert xfrm_drops({"datapath": "xfrm", "totals": {"drops": {"replay": 0, "auth-failed": 0}}, "kernel": {}}) == {}
