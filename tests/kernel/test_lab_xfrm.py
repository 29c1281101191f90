"""`groupsec lab --datapath xfrm --json` inside the VM: the demo's scenario on the kernel data path.

A controller, a sender, two receivers and an eavesdropper in namespaces on a bridge; the
members' agents install their SAs in the kernel (`--datapath xfrm`), the feed goes out as
plain multicast and crosses the bridge as ESP. The summary must say: every packet reached
the receiver that stayed, the evicted one decrypted nothing sent after its eviction, no
authentication failure or replay anywhere, the eavesdropper saw ESP only and decrypted nothing;
and the lab leaves no namespace behind.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kernel_net import IN_VM, SKIP_REASON

from groupsec.netns import child_env

pytestmark = pytest.mark.kernel

DURATION = 12  # two scheduled rollovers and the eviction's; the lab's rate is 50 packets/s
RATE = 50


def _lab_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("gslab")}


def test_lab_on_the_kernel_data_path() -> None:
    if not IN_VM:
        pytest.skip(SKIP_REASON)
    before = _lab_namespaces()
    res = subprocess.run([sys.executable, "-m", "groupsec.cli", "lab", "--datapath", "xfrm", "--json",
                          "--duration", str(DURATION), "--receivers", "2"],
                         capture_output=True, text=True, timeout=420, env=child_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout
    summary = json.loads(lines[0])
    assert summary["ok"] is True
    assert summary["datapath"] == "xfrm"
    assert summary["wire"] == "esp"
    assert summary["sent"] == DURATION * RATE
    assert summary["rollovers"] >= 2
    kept, evicted = summary["receivers"]
    assert (kept["evicted"], evicted["evicted"]) == (False, True)
    assert kept["received"] == summary["sent"]
    assert kept["lost"] == 0
    assert 0 < evicted["received"] < summary["sent"]
    for r in (kept, evicted):
        assert r["auth_failures"] == 0
        assert r["replays"] == 0
        assert r["received_after_eviction"] == 0
    eve = summary["eavesdropper"]
    assert eve["esp_packets"] >= summary["sent"]
    assert eve["cleartext_bytes"] == 0
    assert eve["decrypted"] == 0
    assert eve["registered"] is False
    assert _lab_namespaces() - before == set()
