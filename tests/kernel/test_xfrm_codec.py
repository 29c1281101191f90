"""The XFRM codec and XfrmDatapath against a real kernel, with `ip xfrm` as the oracle.

Runs inside the VM only (tests/kernel/run_in_vm.py); on the host the module skips.
"""

from __future__ import annotations

import pytest
from kernel_net import GROUP, IN_VM, SKIP_REASON, A, datapath, ip_xfrm, make_policy, make_sa, netns, sh

if not IN_VM:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from agent.datapath.base import GroupInstall
from agent.datapath.netlink import XfrmExists, XfrmNetlink, XfrmNotFound
from agent.datapath.xfrm import DEFAULT_PRIORITY, kernel_sa_for
from groupsec.errors import PolicyError
from groupsec.ipsec.params import Lifetime
from groupsec.ipsec.suites import get_suite

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("topology")]

SUITES = ["aes-gcm-16-128", "chacha20-poly1305", "aes-cbc-128-hmac-sha-256", "hmac-sha-256-128"]


@pytest.fixture
def dp():
    d = datapath(A)
    yield d
    d.close()
    leftover = [e.head for e in ip_xfrm("state", A) + ip_xfrm("policy", A)]
    if leftover:
        sh("ip", "xfrm", "state", "flush", ns=A)
        sh("ip", "xfrm", "policy", "flush", ns=A)
        pytest.fail(f"close() left state behind: {leftover}")


def _sa_entry(spi: int):
    hits = [e for e in ip_xfrm("state", A) if f"spi 0x{spi:08x}" in e]
    assert len(hits) == 1, f"SA {spi:#x} not in `ip xfrm state list`"
    return hits[0]


def _policies(direction: str):
    return [e for e in ip_xfrm("policy", A) if f"dir {direction} " in e]


def _check_algorithms(entry, params) -> None:
    s = get_suite(params.suite)
    if s.kind == "aead":
        assert f"aead {s.xfrm_enc} 0x{params.enc_key.hex()} {s.icv_len * 8}" in entry
    else:
        assert f"auth-trunc {s.xfrm_auth} 0x{params.auth_key.hex()} {s.icv_len * 8}" in entry
        if s.protocol == "esp":
            assert f"enc {s.xfrm_enc} 0x{params.enc_key.hex()}" in entry
        else:
            assert "enc " not in entry


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("mode", ["transport", "tunnel"])
@pytest.mark.parametrize("suite", SUITES)
def test_install_matches_ip_xfrm(dp, suite, mode, version):
    policy = make_policy(suite, mode, version)
    sender = "10.99.0.1" if version == 4 else "fd00:99::1"
    rx = make_sa(suite, mode, version, replay_window=64)
    tx = make_sa(suite, mode, version, src=sender, replay_window=32)
    dp.apply(GroupInstall(policy, inbound=(rx,), outbound=tx))
    reqid = dp._groups[policy.key].reqid
    proto = get_suite(suite).protocol
    any_addr = "0.0.0.0" if version == 4 else "::"

    e = _sa_entry(rx.spi)
    assert e.head == f"src {any_addr} dst {policy.dst}"
    assert f"proto {proto} spi 0x{rx.spi:08x} reqid {reqid} mode {mode}" in e
    assert "replay_window 64" in e  # a window above 32 goes in the ESN-format replay state
    _check_algorithms(e, rx)
    e = _sa_entry(tx.spi)
    assert e.head == f"src {sender} dst {policy.dst}"
    assert f"proto {proto} spi 0x{tx.spi:08x} reqid {reqid} mode {mode}" in e
    assert "replay-window 32" in e
    _check_algorithms(e, tx)

    sel = f"src {any_addr}/0 dst {policy.dst}/{32 if version == 4 else 128} proto udp dport 5000"
    (out,) = _policies("out")
    (inb,) = _policies("in")
    assert out.head == sel
    assert inb.head == sel
    assert f"priority {DEFAULT_PRIORITY}" in out
    assert "action block" not in out
    assert f"proto {proto} spi 0x{tx.spi:08x} reqid {reqid} mode {mode}" in out
    assert f"proto {proto} reqid {reqid} mode {mode}" in inb  # any SPI of ours
    if mode == "tunnel":  # address preservation: outer src = the sender, outer dst = the group
        assert f"tmpl src {sender} dst {policy.dst}" in out
        assert f"tmpl src {any_addr} dst {policy.dst}" in inb


def test_receive_only_member_blocks_plaintext_out(dp):
    policy = make_policy("aes-gcm-16-128", "tunnel", 4)
    dp.apply(GroupInstall(policy, inbound=(make_sa("aes-gcm-16-128", "tunnel", 4),)))
    (out,) = _policies("out")
    assert "action block" in out
    assert "tmpl" not in out
    (inb,) = _policies("in")
    assert "action block" not in inb
    assert "tmpl" in inb


def test_lifetimes_encap_and_align4(dp):
    lt = Lifetime(soft_packets=10, hard_packets=20, soft_bytes=1000, hard_bytes=2000, soft_seconds=30,
                  hard_seconds=59.5)
    esp = make_sa("aes-gcm-16-128", "transport", 4, lifetime=lt, udp_encap_port=4500)
    dp.apply(GroupInstall(make_policy("aes-gcm-16-128", "transport", 4, udp_encap_port=4500), inbound=(esp,)))
    e = next(x for x in ip_xfrm("state", A, stats=True) if f"spi 0x{esp.spi:08x}" in x)
    assert "encap type espinudp sport 4500 dport 4500" in e
    assert "limit: soft 1000(bytes), hard 2000(bytes)" in e
    assert "limit: soft 10(packets), hard 20(packets)" in e
    assert "expire add: soft 30(sec), hard 60(sec)" in e
    ah = make_sa("hmac-sha-256-128", "transport", 4, ah_align4=True)
    ah_plain = make_sa("hmac-sha-256-128", "transport", 4)
    dp.apply(GroupInstall(make_policy("hmac-sha-256-128", "transport", 4, group="audio", port=5001), inbound=(ah, ah_plain)))
    assert "flag align4" in _sa_entry(ah.spi)
    assert "align4" not in _sa_entry(ah_plain.spi)
    assert len(ip_xfrm("state", A)) == 3  # two groups side by side
    # the UDP_ENCAP socket that makes the kernel decapsulate ESP-in-UDP
    assert f"{GROUP[4]}:4500" in sh("ss", "-uln", ns=A)
    dp.remove_group(("video", ""))
    assert f"{GROUP[4]}:4500" not in sh("ss", "-uln", ns=A)
    assert {e.body.split()[3] for e in ip_xfrm("state", A)} == {f"0x{ah.spi:08x}", f"0x{ah_plain.spi:08x}"}


def test_rollover_adds_before_switch_and_removes_after(dp):
    policy = make_policy("aes-gcm-16-128", "tunnel", 4)
    src = "10.99.0.1"
    old = make_sa("aes-gcm-16-128", "tunnel", 4, src=src)
    new = make_sa("aes-gcm-16-128", "tunnel", 4, src=src)
    dp.apply(GroupInstall(policy, inbound=(old,), outbound=old))
    assert len(ip_xfrm("state", A)) == 1
    dp.apply(GroupInstall(policy, inbound=(old, new), outbound=old))  # new SA installed before activation
    assert {e.body.split()[3] for e in ip_xfrm("state", A)} == {f"0x{old.spi:08x}", f"0x{new.spi:08x}"}
    assert f"spi 0x{old.spi:08x}" in _policies("out")[0]
    dp.apply(GroupInstall(policy, inbound=(old, new), outbound=new))  # activation: the outbound switch
    assert f"spi 0x{new.spi:08x}" in _policies("out")[0]
    assert len(_policies("out")) == 1
    assert len(_policies("in")) == 1
    dp.apply(GroupInstall(policy, inbound=(new,), outbound=new))  # deactivation of the old SA
    (only,) = ip_xfrm("state", A)
    assert f"spi 0x{new.spi:08x}" in only
    stats = dp.statistics()
    assert [(s["spi"], s["direction"]) for s in stats["sas"]] == [(new.spi, "out")]


def test_reconcile_removes_stale_state_of_ours_only(dp):
    # somebody else's SA and policy (another IPsec daemon): must survive reconcile and close
    sh("ip", "xfrm", "state", "add", "src", "10.99.0.1", "dst", "10.99.0.2", "proto", "esp", "spi", "0x77",
       "reqid", "7", "mode", "transport", "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128", ns=A)
    sh("ip", "xfrm", "policy", "add", "src", "10.99.0.1", "dst", "10.99.0.2", "dir", "out", "priority", "100",
       "tmpl", "proto", "esp", "reqid", "7", "mode", "transport", ns=A)
    # a crashed earlier run of ours: state left behind
    crashed = datapath(A)
    stale = make_sa("aes-gcm-16-128", "tunnel", 4, src="10.99.0.1")
    crashed.apply(GroupInstall(make_policy("aes-gcm-16-128", "tunnel", 4), inbound=(stale,), outbound=stale))
    crashed.nl.close()  # no cleanup
    assert len(ip_xfrm("state", A)) == 2
    assert len(ip_xfrm("policy", A)) == 3

    keep = make_sa("chacha20-poly1305", "transport", 6)
    dp.apply(GroupInstall(make_policy("chacha20-poly1305", "transport", 6), inbound=(keep,)))
    assert dp.reconcile() == 3  # the stale SA and its two policies, nothing else
    states = ip_xfrm("state", A)
    assert {e.body.split()[3] for e in states} == {"0x00000077", f"0x{keep.spi:08x}"}
    assert len(ip_xfrm("policy", A)) == 3  # the foreign one and our two IPv6 ones
    assert dp.reconcile() == 0

    dp.close()
    (foreign,) = ip_xfrm("state", A)
    assert "reqid 7" in foreign
    (fpol,) = ip_xfrm("policy", A)
    assert "priority 100" in fpol
    sh("ip", "xfrm", "state", "flush", ns=A)
    sh("ip", "xfrm", "policy", "flush", ns=A)


def test_refuses_shared_counter_mode_sa_with_sender_ids(dp):
    policy = make_policy("aes-gcm-16-128", "tunnel", 4)
    shared = make_sa("aes-gcm-16-128", "tunnel", 4, sender_id_bits=8, sender_id=3, src="10.99.0.1")
    with pytest.raises(PolicyError, match=r"cannot carry a sender ID.*per-sender SAs"):
        dp.apply(GroupInstall(policy, inbound=(shared,), outbound=shared))
    with pytest.raises(PolicyError, match="sender ID"):
        dp.apply(GroupInstall(policy, inbound=(shared,)))
    assert ip_xfrm("state", A) == []
    assert ip_xfrm("policy", A) == []


def test_refuses_sa_of_another_mode_or_protocol(dp):
    policy = make_policy("aes-gcm-16-128", "tunnel", 4)
    with pytest.raises(PolicyError, match="transport"):
        dp.apply(GroupInstall(policy, inbound=(make_sa("aes-gcm-16-128", "transport", 4),)))
    with pytest.raises(PolicyError, match="ah"):
        dp.apply(GroupInstall(policy, inbound=(make_sa("hmac-sha-256-128", "tunnel", 4),)))
    assert ip_xfrm("state", A) == []


def test_netlink_errors_are_typed():
    sa = make_sa("aes-gcm-16-128", "transport", 4)
    with netns(A):
        nl = XfrmNetlink()
    try:
        nl.add_sa(kernel_sa_for(sa, 0x47530001))
        with pytest.raises(XfrmExists):
            nl.add_sa(kernel_sa_for(sa, 0x47530001))
        got = nl.get_sa(sa.dst, sa.spi, 50)
        assert (got.spi, got.reqid, got.algo_names) == (sa.spi, 0x47530001, ("rfc4106(gcm(aes))",))
        assert sa.enc_key.hex() not in repr(got)
        nl.delete_sa(sa.dst, sa.spi, 50)
        with pytest.raises(XfrmNotFound):
            nl.delete_sa(sa.dst, sa.spi, 50)
        with pytest.raises(XfrmNotFound):
            nl.get_sa(sa.dst, sa.spi, 50)
    finally:
        nl.close()
