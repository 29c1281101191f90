"""`groupsec status` on a home whose controller has never run: no traceback, the configured
levels are listed as not created yet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _groupsec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "groupsec.cli", *args], capture_output=True, text=True, timeout=60)


def test_status_before_the_first_serve(tmp_path: Path) -> None:
    home = tmp_path / "gcks"
    assert _groupsec("init", str(home)).returncode == 0
    proc = _groupsec("status", "-d", str(home), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["running"] is False
    assert [(lv["group"], lv["created"]) for lv in doc["levels"]] == [("video", False)]
    table = _groupsec("status", "-d", str(home))
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    assert "video" in table.stdout
