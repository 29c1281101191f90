"""`groupsec bench datapath --datapath xfrm`: outside a kernel with ESP it exits 2 with a
one-line reason (host); inside the VM its kernel measurement delivers the stream through
XFRM between two namespaces (the figures themselves are not pass/fail)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from kernel_net import IN_VM, SKIP_REASON

from groupsec.bench import datapath as bench
from groupsec.netns import Lan, child_env


@pytest.mark.netns
def test_bench_xfrm_refuses_in_one_line_without_kernel_esp() -> None:
    if IN_VM:
        pytest.skip("the VM's kernel has ESP")
    why = bench.xfrm_refusal("aes-gcm-16-128")
    if why is None:
        pytest.skip("this kernel has ESP and AES-GCM: the refusal cannot be shown here")
    p = subprocess.run([sys.executable, "-m", "groupsec.cli", "bench", "datapath", "--datapath", "xfrm", "--json"],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "--datapath xfrm" in lines[0]


@pytest.mark.kernel
def test_bench_kernel_measurement_delivers_through_xfrm() -> None:
    if not IN_VM:
        pytest.skip(SKIP_REASON)
    args = argparse.Namespace(suite="aes-gcm-16-128", mode="tunnel", size=1000, count=300, rate=0.0)
    with Lan(tag="gsbt") as lan:
        tx, rx = lan.add("tx"), lan.add("rx")
        for ns in (tx, rx):
            ns.ip("route", "add", "239.0.0.0/8", "dev", "eth0")
        r = bench.measure("protected", args, (tx.name, rx.name))
        assert tx.ip("xfrm", "state", "list").stdout == rx.ip("xfrm", "state", "list").stdout == ""
    assert r["sent"] == 300, r  # the outbound SA encrypted every packet the application sent
    assert 0 < r["delivered"] <= r["sent"], r
    assert r["auth_failures"] == 0, r
    assert r["pps"] > 0, r
