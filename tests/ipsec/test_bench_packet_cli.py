"""`groupsec bench packet --json` prints the documented object (the demo has its own tests in tests/test_demo.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from groupsec.bench import packet


def test_bench_packet_json_shape() -> None:
    out = subprocess.run([sys.executable, "-m", "groupsec.cli", "bench", "packet", "--json", "--iterations", "3",
                          "--repeats", "1"], capture_output=True, text=True, check=True, timeout=120).stdout
    result = json.loads(out)
    assert result["bench"] == "packet"
    rows = result["results"]
    assert {(r["suite"], r["size"], r["op"]) for r in rows} == {
        (s, n, op) for s in packet.SUITES for n in packet.SIZES for op in ("seal", "open")
    }
    for r in rows:
        assert set(r) == {"suite", "mode", "size", "op", "ns", "baseline_ns", "ratio"}
        assert r["mode"] == "tunnel"
        assert r["ns"] > 0
        assert r["baseline_ns"] > 0
        assert abs(r["ratio"] - r["ns"] / r["baseline_ns"]) < 0.01 * r["ratio"] + 0.001
    assert "ratio" in packet.render(result)
