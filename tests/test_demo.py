"""`groupsec demo --json --duration 10`: the whole system as separate processes on loopback.

One run (module fixture) is checked field by field, and its --pcap/--keys export is opened by
tshark (every ESP packet decrypts to exactly what the sender sent) and by `groupsec inspect`
(ok for every packet; a flipped bit, a duplicate and a missing SA give the right verdicts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from e2e.summary_checks import check_receivers

from groupsec import pcap, uat
from groupsec.demo import ENCAP_PORT, payload
from groupsec.inspect import inspect_capture

pytestmark = pytest.mark.slow

DURATION = 10
RATE = 50


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    d = tmp_path_factory.mktemp("demo")
    cap, keys = d / "demo.pcap", d / "demo.keys"
    res = subprocess.run([sys.executable, "-m", "groupsec.cli", "demo", "--json", "--duration", str(DURATION),
                          "--pcap", str(cap), "--keys", str(keys)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout  # --json: one object, no live view
    return json.loads(lines[0]), cap, keys


def test_summary_every_field(demo_run) -> None:
    summary, _, _ = demo_run
    assert set(summary) == {"ok", "sent", "rollovers", "receivers"}
    assert summary["ok"] is True
    assert summary["sent"] == DURATION * RATE
    # 5 s scheduled rollovers plus the eviction's own within 10 s
    assert 2 <= summary["rollovers"] <= 5
    check_receivers(summary, RATE)


def test_keys_file_is_private_and_lists_the_sas(demo_run) -> None:
    summary, _, keys = demo_run
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    entries = uat.load_esp_sa(str(keys))
    assert len(entries) >= summary["rollovers"] + 1
    assert {e.suite for e in entries} == {"aes-gcm-16-128"}


def _feed(cap: Path) -> list[bytes]:
    return [r.data for r in pcap.read_capture_untrusted(cap.read_bytes())]


def test_inspect_says_ok_for_every_packet_of_the_demo_capture(demo_run) -> None:
    summary, cap, keys = demo_run
    verdicts = inspect_capture(cap.read_bytes(), uat.load_esp_sa(str(keys)))
    assert len(verdicts) == summary["sent"]
    assert {v.verdict for v in verdicts} == {"ok"}
    assert sorted(v.payload for v in verdicts) == sorted(payload(s) for s in range(summary["sent"]))


def test_inspect_flipped_duplicate_and_unknown_on_the_demo_capture(demo_run, tmp_path) -> None:
    _, cap, keys = demo_run
    packets = _feed(cap)
    flipped = bytearray(packets[10])
    flipped[-5] ^= 0x04
    mutated = [*packets[:10], bytes(flipped), packets[10], packets[10], *packets[11:20]]
    entries = uat.load_esp_sa(str(keys))
    spi_first = int.from_bytes(packets[0][28:32], "big")
    verdicts = inspect_capture(pcap.pcap_bytes([(1.0, p) for p in mutated]), entries)
    assert [v.verdict for v in verdicts] == ["ok"] * 10 + ["auth-failed", "ok", "replay"] + ["ok"] * 9
    without = [e for e in entries if e.spi != spi_first]
    verdicts = inspect_capture(pcap.pcap_bytes([(1.0, p) for p in packets[:5]]), without)
    assert [v.verdict for v in verdicts] == ["unknown-spi"] * 5


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_decrypts_every_esp_packet_to_what_the_sender_sent(demo_run, tmp_path) -> None:
    summary, cap, keys = demo_run
    conf = tmp_path / "wireshark"
    conf.mkdir()
    shutil.copy(keys, conf / "esp_sa")
    res = subprocess.run(
        ["tshark", "-n", "-r", str(cap), "-o", "esp.enable_encryption_decode:TRUE",
         "-o", "esp.enable_authentication_check:TRUE", "-d", f"udp.port=={ENCAP_PORT},udpencap",
         "-T", "fields", "-E", "occurrence=l", "-e", "esp.spi", "-e", "esp.icv_good", "-e", "udp.payload"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "WIRESHARK_CONFIG_DIR": str(conf)})
    assert res.returncode == 0, res.stderr
    rows = [line.split("\t") for line in res.stdout.splitlines()]
    assert len(rows) == summary["sent"]
    assert all(r[0].startswith("0x") and r[1] == "1" for r in rows), rows[:3]
    got = sorted(bytes.fromhex(r[2]) for r in rows)
    assert got == sorted(payload(s) for s in range(summary["sent"]))


def test_bad_options_are_one_line_errors() -> None:
    res = subprocess.run([sys.executable, "-m", "groupsec.cli", "demo", "--duration", "0.5"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == "groupsec demo: error: --duration 0.5: must be 2..3600 seconds"
