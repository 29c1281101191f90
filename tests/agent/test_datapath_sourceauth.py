"""Source authentication in the userspace data path's engine, with installs that come from real
controller grants through the member state machine (GroupManager -> Grant -> MemberProtocol ->
DesiredInstall -> GroupInstall -> GroupEngine). No sockets; the e2e tests use real ones."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.datapath.base import GroupInstall
from agent.datapath.engine import GroupEngine, NoSigningKey
from agent.datapath.xfrm import XfrmDatapath
from groupsec.controller.config import parse_config
from groupsec.controller.groups import GroupManager
from groupsec.controller.store import MemoryStore
from groupsec.errors import PacketDropped, PolicyError
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.protocol.member import InstallChanged, MemberProtocol
from groupsec.protocol.messages import GroupRequest, Registered

G = "239.7.7.7"
PORT = 5004


def world(mode: str, policy: str = "shared") -> tuple[GroupManager, object]:
    text = (f'[groups.cams]\ndst = "{G}"\nrekey_channel = "239.7.7.255:7500"\nsender_policy = "{policy}"\n'
            f'protocol = "udp"\nport = {PORT}\nudp_encap_port = 4500\nsource_auth = "{mode}"\n')
    if policy == "shared":
        text += "sender_id_bits = 8\n"
    config = parse_config(tomllib.loads(text), "groupsec.toml")
    gm = GroupManager(config, MemoryStore())
    gm.load_or_create(100.0)
    return gm, config.levels[("cams", "")]


def install_from(grant, now: float = 0.0) -> GroupInstall:
    """What the agent session hands its data path for this grant (member.py + session.py mapping)."""
    m = MemberProtocol([GroupRequest("cams", grant.role)])
    m.connect(now)
    m.messages_to_send()
    m.receive_message(Registered("m", [grant.to_wire()], bytes(32), 100.0, 30.0), now)
    inst = None
    while (ev := m.next_event()) is not None:
        if isinstance(ev, InstallChanged):
            inst = ev.install
    assert inst is not None
    return GroupInstall(inst.policy, inst.inbound, inst.outbound, dict(inst.sender_keys), dict(inst.owners),
                        inst.signing_key)


def members(mode: str, policy: str = "shared"):
    gm, lc = world(mode, policy)
    gm.ensure_sender("cam1", lc, 100.0)
    tx = install_from(gm.grant("cam1", lc, {"sender"}))
    rx = install_from(gm.grant("tv", lc, {"receiver"}))
    return gm, lc, tx, rx


def sendall(engine: GroupEngine, payloads: list[bytes], now: float) -> list[bytes]:
    out: list[bytes] = []
    for p in payloads:
        out += engine.seal_payload(p, 1000, PORT, now)
    return out + engine.flush()


@pytest.mark.parametrize("policy", ["shared", "per-sender"])
@pytest.mark.parametrize("mode", ["sign", "sign-batched"])
def test_real_grants_sign_and_verify_and_a_receiver_cannot_forge(mode: str, policy: str) -> None:
    _, _, tx, rx = members(mode, policy)
    assert tx.signing_key is not None
    assert rx.signing_key is None
    assert rx.sender_keys
    assert tx.outbound is not None
    s = GroupEngine(tx, "encap", "10.0.0.1", 0.0)
    r = GroupEngine(rx, "encap", "10.0.0.2", 0.0)
    wire = sendall(s, [b"frame %d" % i for i in range(5)], 1.0)
    assert [bytes(r.open_encap_untrusted(d, "10.0.0.1", 1.0)[1]) for d in wire] == [b"frame %d" % i for i in range(5)]
    # the receiver holds the group SA: it seals a packet in the sender's name (its sender ID
    # in the IV, or the sender's own per-sender SA), far ahead in sequence numbers, and signs
    # it with a key of its own, or not at all
    victim = dataclasses.replace(tx.outbound)
    for key in (Ed25519PrivateKey.generate().private_bytes_raw(), None):
        forger = GroupEngine(dataclasses.replace(rx, outbound=victim, signing_key=key), "encap", "10.0.0.3", 0.0)
        forger.outbound = SecurityAssociation(victim, "out", 0.0, _test_next_seq=1000)
        if key is None:  # no signature: an ordinary group packet (a mode-"none" engine makes it)
            plain = dataclasses.replace(rx.policy, source_auth="none")
            forger = GroupEngine(dataclasses.replace(rx, policy=plain, outbound=victim), "encap", "10.0.0.3", 0.0)
            forger.outbound = SecurityAssociation(victim, "out", 0.0, _test_next_seq=2000)
        for d in sendall(forger, [b"evil"] * 3, 1.0):
            with pytest.raises(PacketDropped) as exc:
                r.open_encap_untrusted(d, "10.0.0.3", 1.0)
            r.count_drop(exc.value)
            assert exc.value.reason in ("source-auth-failed", "malformed")
    assert r.drops["source-auth-failed"] == 3  # signed by the wrong key
    assert r.drops["malformed"] == 3  # no trailer of the group's type at all
    # the forgeries did not move the replay window: the sender's next packets still arrive
    wire = sendall(s, [b"after"], 2.0)
    assert bytes(r.open_encap_untrusted(wire[0], "10.0.0.1", 2.0)[1]) == b"after"
    assert r.statistics()["source_auth"]["mode"] == mode


def test_batched_window_closes_by_count_or_by_timer() -> None:
    _, _, tx, rx = members("sign-batched")
    s = GroupEngine(tx, "encap", "10.0.0.1", 0.0)
    r = GroupEngine(rx, "encap", "10.0.0.2", 0.0)
    armed: list[float | None] = []
    s.on_timer_armed = lambda: armed.append(s.get_timer())
    assert s.seal_payload(b"p0", 1, PORT, 10.0) == []
    assert armed == [pytest.approx(10.020)]  # the shell's timer is woken once per window
    assert s.handle_timer(10.019) == []
    out = s.handle_timer(10.020)
    assert len(out) == 1
    assert s.get_timer() is None
    held = [s.seal_payload(b"q%d" % i, 1, PORT, 11.0) for i in range(32)]
    assert held[:31] == [[]] * 31
    assert len(held[31]) == 32
    for d in out + held[31]:
        r.open_encap_untrusted(d, "10.0.0.1", 11.0)
    assert r.rx_packets == 33
    assert r.statistics()["source_auth"]["signature_checks"] == 2  # one per window


def test_revocation_through_apply_rejects_the_next_packets() -> None:
    gm, _lc, tx, rx = members("sign-batched")
    s = GroupEngine(tx, "encap", "10.0.0.1", 0.0)
    r = GroupEngine(rx, "encap", "10.0.0.2", 0.0)
    first = sendall(s, [b"a", b"b"], 1.0)
    r.open_encap_untrusted(first[0], "10.0.0.1", 1.0)  # its window is verified and cached
    (_, roll), = gm.evict("cam1", 200.0)
    r.apply(dataclasses.replace(rx, sender_keys=roll.inner["sender_keys"]), 2.0)
    for d in [first[1], *sendall(s, [b"c"], 2.0)]:
        with pytest.raises(PacketDropped) as exc:
            r.open_encap_untrusted(d, "10.0.0.1", 2.0)
        assert exc.value.reason == "source-auth-failed"


def test_sender_without_signing_key_refuses_to_send_unsigned() -> None:
    _, _, tx, _ = members("sign")
    s = GroupEngine(dataclasses.replace(tx, signing_key=None), "encap", "10.0.0.1", 0.0)
    with pytest.raises(NoSigningKey):
        s.seal_payload(b"x", 1, PORT, 1.0)


@pytest.mark.parametrize("mode", ["sign", "sign-batched"])
def test_xfrm_data_path_refuses_source_auth_groups(mode: str) -> None:
    """The kernel has no signature transform: an agent on XFRM refuses the group (before any
    netlink call) instead of accepting packets any member could have forged."""
    _, _, _, rx = members(mode)
    dp = XfrmDatapath(netlink=object())  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="no signature transform"):
        dp.apply(rx)
