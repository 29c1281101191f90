"""``groupsec bench evict`` prints the documented JSON (a smoke test on a small group; the
benchmark's figures are not pass/fail)."""

from __future__ import annotations

import argparse
import json

from groupsec.bench import evict


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evict.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_evict_json() -> None:
    out = json.loads(json.dumps(evict.run(_args("--members", "60,300", "--evictions", "2"))))
    assert list(out) == ["bench", "results"]
    assert out["bench"] == "evict"
    assert [r["members"] for r in out["results"]] == [60, 300]
    for r in out["results"]:
        assert set(r) == {"members", "bytes", "wraps", "ms", "baseline_bytes"}
        assert 0 < r["bytes"] < r["baseline_bytes"]
        assert r["wraps"] >= 2
    table = evict.render(out)
    assert "baseline bytes" in table
    assert str(out["results"][1]["baseline_bytes"]) in table
