"""`groupsec lab --json --duration 8`: the demo's scenario over raw ESP in network namespaces.

One run (module fixture) is checked field by field; its --pcap/--keys export shows what
crossed the bridge: ESP directly in IPv4 (protocol 50, no UDP), no feed payload in the clear,
and every packet opens with the exported SAs to exactly what the sender sent. Without
CAP_NET_ADMIN, and with --datapath xfrm on a kernel without ESP, the lab refuses in one line
with exit code 2 and leaves no namespace behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from netns import skip_unless_netns
from summary_checks import check_receivers

from groupsec import pcap, uat
from groupsec.demo import MAGIC, payload
from groupsec.inspect import inspect_capture
from groupsec.lab import xfrm_refusal
from groupsec.netns import child_env

pytestmark = [pytest.mark.netns, pytest.mark.slow]

DURATION = 8
RATE = 50


def _lab_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("gslab")}


def _lab(*args: str, prefix: tuple[str, ...] = (), timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "groupsec.cli", "lab", *args], capture_output=True,
                          text=True, timeout=timeout, env=child_env())


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path, set[str]]:
    skip_unless_netns()
    d = tmp_path_factory.mktemp("lab")
    cap, keys = d / "lab.pcap", d / "lab.keys"
    before = _lab_namespaces()
    res = _lab("--json", "--duration", str(DURATION), "--pcap", str(cap), "--keys", str(keys))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout  # --json: one object, no live view
    return json.loads(lines[0]), cap, keys, _lab_namespaces() - before


def test_summary_every_field(lab_run) -> None:
    summary, _, _, _ = lab_run
    assert set(summary) == {"ok", "sent", "rollovers", "receivers", "datapath", "wire", "eavesdropper"}
    assert summary["ok"] is True
    assert summary["datapath"] == "userspace"
    assert summary["wire"] == "esp"
    assert summary["sent"] == DURATION * RATE
    # 5 s scheduled rollovers plus the eviction's own within 8 s
    assert 2 <= summary["rollovers"] <= 5
    check_receivers(summary, RATE)
    eve = summary["eavesdropper"]
    assert set(eve) == {"name", "packets_captured", "esp_packets", "cleartext_packets", "cleartext_bytes",
                        "decrypted", "registered"}
    assert eve["name"] == "eavesdropper"
    assert eve["packets_captured"] >= eve["esp_packets"] >= summary["sent"]
    assert eve["cleartext_packets"] == 0
    assert eve["cleartext_bytes"] == 0
    assert eve["decrypted"] == 0
    assert eve["registered"] is False


def test_the_bridge_carried_raw_esp_only_and_it_opens_to_the_feed(lab_run) -> None:
    summary, cap, keys, _ = lab_run
    records = list(pcap.read_capture_untrusted(cap.read_bytes()))
    assert len(records) >= summary["sent"]
    for r in records:
        assert r.data[0] >> 4 == 4
        assert r.data[9] == 50  # protocol ESP: not ESP-in-UDP
        assert MAGIC not in r.data
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    verdicts = inspect_capture(cap.read_bytes(), uat.load_esp_sa(str(keys)))
    assert {v.verdict for v in verdicts} == {"ok"}
    got = [v.payload for v in verdicts]
    assert sorted(set(got)) == sorted(payload(s) for s in range(summary["sent"]))


def test_namespaces_are_removed(lab_run) -> None:
    _, _, _, left = lab_run
    assert left == set()


def test_without_cap_net_admin_it_refuses_in_one_line() -> None:
    skip_unless_netns()
    before = _lab_namespaces()
    drop = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")  # root's capabilities, all dropped
    res = _lab("--duration", "3", prefix=drop, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("groupsec lab: error: needs root (CAP_NET_ADMIN)")
    assert _lab_namespaces() == before


def test_xfrm_without_kernel_esp_refuses_in_one_line() -> None:
    skip_unless_netns()
    why = xfrm_refusal("aes-gcm-16-128")
    if why is None:
        pytest.skip("this kernel has ESP with AES-GCM: the xfrm lab runs (tests/kernel covers it)")
    res = _lab("--datapath", "xfrm", "--duration", "3", timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr == f"groupsec lab: error: --datapath xfrm: {why}\n"
    assert "rfc4106(gcm(aes))" in res.stderr


def test_bad_options_are_one_line_errors() -> None:
    res = _lab("--receivers", "0", timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == "groupsec lab: error: --receivers 0: must be 1..50"


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
