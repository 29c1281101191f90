"""XFRM policies on the host kernel (no VM): XFRM policies need no crypto modules, so the
fail-closed part of XfrmDatapath, reconcile and close are tested here on every run.
SAs need esp4/ah4/GCM, which the container kernels lack: those tests run in the VM.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import uuid

import pytest
from kernel_net import netns

from agent.datapath.base import GroupInstall
from agent.datapath.netlink import (
    XFRM_POLICY_BLOCK,
    XFRM_POLICY_OUT,
    PolicyInfo,
    Selector,
    XfrmError,
    XfrmNetlink,
    XfrmNotFound,
)
from agent.datapath.xfrm import DEFAULT_PRIORITY, XfrmDatapath
from groupsec.ipsec.policy import GroupPolicy

pytestmark = pytest.mark.netns


@pytest.fixture
def ns():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    name = f"gsx-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode:
        pytest.skip("cannot create a network namespace here")
    # not lo: the kernel exempts loopback from XFRM (disable_xfrm/disable_policy)
    for cmd in (["link", "set", "lo", "up"], ["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                ["link", "set", "v0", "up"], ["link", "set", "v1", "up"],
                ["addr", "add", "10.98.0.1/24", "dev", "v0"], ["route", "add", "224.0.0.0/4", "dev", "v0"]):
        subprocess.run(["ip", "-n", name, *cmd], check=True, capture_output=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def _ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "ip", *args], capture_output=True, text=True,
                          check=True).stdout


def test_receive_only_group_blocks_plaintext_and_close_cleans_up(ns):
    policy = GroupPolicy("video", "239.9.9.9", port=5000, udp_encap_port=None)
    with netns(ns):
        dp = XfrmDatapath()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        idx = socket.if_nametoindex("v0")
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("4s4si", bytes(4), bytes(4), idx))
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"before", ("239.9.9.9", 5000))  # not protected yet: plaintext goes out
        dp.apply(GroupInstall(policy))  # no SAs yet: receive nothing, send nothing
        with pytest.raises(PermissionError):
            s.sendto(b"secret", ("239.9.9.9", 5000))
        with netns(ns):  # a fresh socket too (no cached route)
            fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with fresh, pytest.raises(PermissionError):
            fresh.sendto(b"secret", ("239.9.9.9", 5000))
        other.sendto(b"other port", ("239.9.9.9", 5001))  # outside the group's selector: untouched
        out = _ip(ns, "xfrm", "policy", "list")
        assert f"dir out action block priority {DEFAULT_PRIORITY}" in out
        assert f"dir in priority {DEFAULT_PRIORITY}" in out
        dp.close()
        assert _ip(ns, "xfrm", "policy", "list").strip() == ""
        s.sendto(b"after", ("239.9.9.9", 5000))  # the agent left nothing behind
    finally:
        s.close()
        other.close()
        dp.close()


def test_reconcile_and_close_spare_foreign_policies(ns):
    _ip(ns, "xfrm", "policy", "add", "dst", "10.1.1.1/32", "dir", "out", "priority", "100", "action", "block")
    with netns(ns):
        crashed = XfrmDatapath()
        dp = XfrmDatapath()
    crashed.apply(GroupInstall(GroupPolicy("a", "239.1.1.1", udp_encap_port=None)))
    crashed.nl.close()
    dp.apply(GroupInstall(GroupPolicy("b", "ff15::9", udp_encap_port=None)))
    assert dp.reconcile() == 2
    out = _ip(ns, "xfrm", "policy", "list")
    assert "239.1.1.1" not in out
    assert "ff15::9" in out
    assert "10.1.1.1" in out
    dp.close()
    out = _ip(ns, "xfrm", "policy", "list")
    assert "ff15::9" not in out
    assert "10.1.1.1/32" in out


def test_policy_codec_round_trip_and_typed_errors(ns):
    with netns(ns):
        nl = XfrmNetlink()
    with nl:
        sel = Selector(socket.AF_INET6, "ff15::1", "fd00::1", 128, 128, 17, 4000, 0)
        nl.add_policy(PolicyInfo(sel, XFRM_POLICY_OUT, XFRM_POLICY_BLOCK, 77))
        (got,) = nl.dump_policies()
        assert (got.selector, got.dir, got.action, got.priority, got.templates) == (sel, 1, 1, 77, ())
        assert "src fd00::1/128 dst ff15::1/128 proto udp dport 4000" in _ip(ns, "xfrm", "policy", "list")
        with pytest.raises(XfrmError) as exc:
            nl.add_policy(PolicyInfo(sel, XFRM_POLICY_OUT, XFRM_POLICY_BLOCK, 77))
        assert exc.value.errno == 17  # EEXIST
        nl.delete_policy(XFRM_POLICY_OUT, index=got.index)
        with pytest.raises(XfrmNotFound):
            nl.delete_policy(XFRM_POLICY_OUT, index=got.index)
        assert nl.dump_policies() == []
