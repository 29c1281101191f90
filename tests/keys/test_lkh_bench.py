"""``groupsec bench evict`` prints the documented JSON (a smoke test on a small group; the
benchmark's figures are not pass/fail)."""

from __future__ import annotations

import json

import pytest

from groupsec.cli import main


def test_bench_evict_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "evict", "--json", "--members", "60,300", "--evictions", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "evict"
    assert list(out) == ["bench", "results"]
    assert [r["members"] for r in out["results"]] == [60, 300]
    for r in out["results"]:
        assert set(r) == {"members", "bytes", "wraps", "ms", "baseline_bytes"}
        assert 0 < r["bytes"] < r["baseline_bytes"]
        assert r["wraps"] >= 2
    assert main(["bench", "evict", "--members", "60", "--evictions", "1"]) == 0
    assert "baseline bytes" in capsys.readouterr().out
