"""The member state machine, in memory with a fake clock: every message and error path."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from member_helpers import FakeController

from groupsec.errors import LocalProtocolError, RemoteProtocolError
from groupsec.protocol.member import (
    RESYNC_RETRY,
    SILENCE,
    ControllerError,
    GroupRemoved,
    InstallChanged,
    KeepaliveTimeout,
    MemberProtocol,
    RegisteredEvent,
    RekeyApplied,
    RekeyRejected,
    ResyncRequested,
)
from groupsec.protocol.messages import (
    Ack,
    Bye,
    Error,
    GroupRequest,
    Ping,
    Pong,
    Register,
    RekeyPush,
    Resync,
    ResyncReply,
)
from groupsec.protocol.rekey import build_rekey_datagrams

T0 = 50.0  # member clock (monotonic); the controller clock is FakeController.now


def events(m: MemberProtocol) -> list:
    out = []
    while (e := m.next_event()) is not None:
        out.append(e)
    return out


def of(evs: list, cls: type) -> list:
    return [e for e in evs if isinstance(e, cls)]


def no_jitter(high: float) -> float:
    return high  # deterministic: the ack goes out exactly ack_jitter seconds later


def registered_member(role: str = "receiver", groups: tuple[str, ...] = ("video",), ack_jitter: float = 0.5):
    ctl = FakeController()
    for g in groups:
        if ("video" if g == "video" else g, "") not in ctl.levels:
            ctl.add_group(g, dst="239.1.1.1" if g == "video" else "239.1.1.2")
    m = MemberProtocol([GroupRequest(g, role) for g in groups], ack_jitter=ack_jitter, jitter=no_jitter)
    m.connect(T0)
    (reg,) = m.messages_to_send()
    assert isinstance(reg, Register)
    m.receive_message(ctl.registered(*(ctl.grant(g, role, sender_id=7) for g in groups)), T0)
    return ctl, m, events(m)


def install(evs: list, key=("video", "")):
    found = [e.install for e in evs if isinstance(e, InstallChanged) and e.install.policy.key == key]
    return found[-1] if found else None


# --- registration ----------------------------------------------------------------------------


def test_connect_sends_register_with_requests_and_no_known_ids():
    m = MemberProtocol([GroupRequest("video", "sender"), GroupRequest("audio", "receiver", "hd")])
    m.connect(T0)
    (reg,) = m.messages_to_send()
    assert isinstance(reg, Register)
    assert reg.requests() == [GroupRequest("video", "sender"), GroupRequest("audio", "receiver", "hd")]
    assert reg.known is None
    assert m.messages_to_send() == []


def test_no_groups_is_a_local_error_and_double_connect_too():
    with pytest.raises(LocalProtocolError):
        MemberProtocol([])
    m = MemberProtocol([GroupRequest("video", "receiver")])
    m.connect(T0)
    with pytest.raises(LocalProtocolError):
        m.connect(T0)


def test_receiver_gets_inbound_only_no_outbound_sa():
    ctl, _m, evs = registered_member("receiver")
    (reg,) = of(evs, RegisteredEvent)
    assert reg.groups == (("video", ""),)
    inst = install(evs)
    assert [sa.spi for sa in inst.inbound] == [s.params.spi for s in ctl.levels[("video", "")].sas]
    assert inst.outbound is None


def test_sender_gets_outbound_with_its_sender_id():
    ctl, _m, evs = registered_member("sender")
    inst = install(evs)
    assert inst.outbound is not None
    assert inst.outbound.spi == ctl.levels[("video", "")].sas[0].params.spi
    assert inst.outbound.sender_id == 7
    assert all(sa.sender_id is None for sa in inst.inbound)


def test_rekey_before_registration_is_unexpected():
    ctl = FakeController()
    ctl.add_group("video")
    m = MemberProtocol([GroupRequest("video", "receiver")])
    m.connect(T0)
    with pytest.raises(RemoteProtocolError) as ei:
        m.receive_message(RekeyPush(b"x"), T0)
    assert ei.value.code == "unexpected-message"


def test_message_in_idle_state_is_unexpected():
    m = MemberProtocol([GroupRequest("video", "receiver")])
    with pytest.raises(RemoteProtocolError, match="not expected"):
        m.receive_message(Pong(1), T0)


def test_second_registered_is_unexpected():
    ctl, m, _ = registered_member()
    with pytest.raises(RemoteProtocolError) as ei:
        m.receive_message(ctl.registered(ctl.grant("video")), T0)
    assert ei.value.code == "unexpected-message"


def test_grant_for_a_group_not_requested_is_refused():
    ctl = FakeController()
    ctl.add_group("video")
    ctl.add_group("other", dst="239.1.1.3")
    m = MemberProtocol([GroupRequest("video", "receiver")])
    m.connect(T0)
    with pytest.raises(RemoteProtocolError, match="not requested"):
        m.receive_message(ctl.registered(ctl.grant("video"), ctl.grant("other")), T0)
    assert m.levels == {}


def test_registered_with_a_bad_signing_key_is_refused():
    ctl = FakeController()
    ctl.add_group("video")
    m = MemberProtocol([GroupRequest("video", "receiver")])
    m.connect(T0)
    reg = ctl.registered(ctl.grant("video"))
    bad = type(reg)(reg.member, reg.grants, b"\x00" * 5, reg.server_time, reg.heartbeat_interval)
    with pytest.raises(RemoteProtocolError):
        m.receive_message(bad, T0)


@pytest.mark.parametrize("msg", [Error("not-authorized", "no"), Bye("shutting down")])
def test_error_or_bye_closes_the_session(msg):
    m = MemberProtocol([GroupRequest("video", "sender")])
    m.connect(T0)
    m.receive_message(msg, T0)
    (ev,) = of(events(m), ControllerError)
    assert ev.code == (msg.code if isinstance(msg, Error) else "bye")
    assert m.state == "closed"
    m.connect(T0 + 1)  # a new session may start
    assert m.state == "registering"


def test_controller_ping_is_answered_with_pong():
    _, m, _ = registered_member()
    m.receive_message(Ping(42), T0)
    assert m.messages_to_send() == [Pong(42)]


# --- rekeys -------------------------------------------------------------------------------------


def test_receiver_installs_new_inbound_at_once_and_drops_old_after_dtd():
    ctl, m, _ = registered_member("receiver")
    old_spi = ctl.levels[("video", "")].sas[0].params.spi
    (dg,) = ctl.rekey("video")
    new_spi = ctl.levels[("video", "")].sas[-1].params.spi
    m.receive_datagram(dg, T0)
    evs = events(m)
    assert [sa.spi for sa in install(evs).inbound] == [old_spi, new_spi]
    (applied,) = of(evs, RekeyApplied)
    assert (applied.msg_id, applied.source) == (2, "multicast")
    pol = ctl.levels[("video", "")].policy
    deact = T0 + pol.atd + pol.dtd
    assert m.get_timer() is not None
    m.handle_timer(deact - 0.01)
    assert install(events(m)) is None  # not yet
    m.handle_timer(deact + 0.001)
    assert [sa.spi for sa in install(events(m)).inbound] == [new_spi]


def test_sender_switches_outbound_exactly_at_activation():
    ctl, m, _ = registered_member("sender")
    old_spi = ctl.levels[("video", "")].sas[0].params.spi
    (dg,) = ctl.rekey("video")
    new_spi = ctl.levels[("video", "")].sas[-1].params.spi
    m.receive_datagram(dg, T0 + 0.1)
    inst = install(events(m))
    assert inst.outbound.spi == old_spi  # before ATD the sender keeps the old SA
    assert new_spi in [sa.spi for sa in inst.inbound]  # but already receives on the new one
    act = T0 + ctl.levels[("video", "")].policy.atd  # controller "now" was mapped onto T0
    timers = []
    while (t := m.get_timer()) is not None and t <= act + 1e-6:
        timers.append(t)
        m.handle_timer(t)
        if install(events(m)) is not None:
            break
    assert timers
    assert abs(timers[-1] - act) < 1e-6
    assert m.install_for(("video", ""), act).outbound.spi == new_spi
    assert m.install_for(("video", ""), act).outbound.sender_id == 7


def test_forged_rekey_is_rejected_and_counted():
    ctl, m, _ = registered_member()
    lv = ctl.levels[("video", "")]
    forged = build_rekey_datagrams(Ed25519PrivateKey.generate(), lv.kek_epoch, lv.kek, "video", "", 9, "rekey",
                                   {"sas": [], "remove": [lv.sas[0].params.spi]}, ctl.now)[0]
    m.receive_datagram(forged, T0)
    evs = events(m)
    assert [e.reason for e in of(evs, RekeyRejected)] == ["bad-signature"]
    assert m.rejected == {"bad-signature": 1}
    assert install(evs) is None
    assert m.levels[("video", "")].msg_id == 1


def test_replayed_rekey_is_rejected():
    ctl, m, _ = registered_member()
    (dg,) = ctl.rekey("video")
    m.receive_datagram(dg, T0)
    events(m)
    m.receive_datagram(dg, T0 + 0.5)
    assert [e.reason for e in of(events(m), RekeyRejected)] == ["replayed"]
    assert m.rejected == {"replayed": 1}


def test_older_msg_id_is_rejected_as_replayed():
    ctl, m, _ = registered_member()
    (old,) = ctl.rekey("video")
    (new,) = ctl.rekey("video")
    m.receive_datagram(new, T0)
    events(m)
    m.receive_datagram(old, T0)
    assert [e.reason for e in of(events(m), RekeyRejected)] == ["replayed"]


def test_cross_group_rekey_is_rejected_as_wrong_group():
    ctl, m, _ = registered_member(groups=("video",))
    ctl.add_group("audio", dst="239.1.1.2")
    (dg,) = ctl.rekey("audio")  # properly signed by our controller, but for a group we are not in
    m.receive_datagram(dg, T0)
    assert [e.reason for e in of(events(m), RekeyRejected)] == ["wrong-group"]
    assert m.levels[("video", "")].msg_id == 1


def test_rekey_under_a_kek_we_do_not_have_is_undecryptable():
    ctl, m, _ = registered_member()
    lv = ctl.levels[("video", "")]
    (dg,) = ctl.rekey("video", kek=(lv.kek_epoch, os.urandom(32)))
    m.receive_datagram(dg, T0)
    assert [e.reason for e in of(events(m), RekeyRejected)] == ["undecryptable"]
    assert m.messages_to_send() == []


def test_unknown_kek_epoch_triggers_resync():
    ctl, m, _ = registered_member()
    lv = ctl.levels[("video", "")]
    (dg,) = ctl.rekey("video", kek=(lv.kek_epoch + 1, os.urandom(32)))
    m.receive_datagram(dg, T0)
    evs = events(m)
    assert [e.reason for e in of(evs, RekeyRejected)] == ["unknown-kek"]
    assert [e.why for e in of(evs, ResyncRequested)] == ["unknown-kek"]
    assert m.messages_to_send() == [Resync("video", "", 1)]


def test_garbage_datagram_is_counted_not_raised():
    _, m, _ = registered_member()
    m.receive_datagram(b"\x93\x01\xc4", T0)
    assert m.rejected == {"bad-format": 1}


def test_datagram_before_registration_is_counted():
    m = MemberProtocol([GroupRequest("video", "receiver")])
    m.receive_datagram(b"anything", T0)
    assert m.rejected == {"not-registered": 1}


def test_rekey_over_tls_push_is_applied_like_multicast():
    ctl, m, _ = registered_member()
    (dg,) = ctl.rekey("video")
    m.receive_message(RekeyPush(dg), T0)
    (applied,) = of(events(m), RekeyApplied)
    assert applied.source == "unicast"
    m.receive_datagram(dg, T0)  # the same rekey arriving by multicast afterwards: a replay, dropped
    assert m.rejected == {"replayed": 1}


def test_fragmented_rekey_is_reassembled():
    ctl, m, _ = registered_member()
    dgs = ctl.rekey("video", new_sas=12, mtu=400)
    assert len(dgs) > 2
    for dg in reversed(dgs):
        m.receive_datagram(dg, T0)
    inst = install(events(m))
    assert len(inst.inbound) == 13
    assert m.rejected == {}


def test_kek_rollover_then_rekey_under_new_kek():
    ctl, m, _ = registered_member()
    (dg1,) = ctl.rekey("video", new_kek=True)
    (dg2,) = ctl.rekey("video")  # sealed under the new KEK
    m.receive_datagram(dg1, T0)
    m.receive_datagram(dg2, T0)
    assert [e.msg_id for e in of(events(m), RekeyApplied)] == [2, 3]
    assert m.levels[("video", "")].kek_epoch == 2


def test_remove_list_drops_sas_at_once():
    ctl, m, _ = registered_member()
    old_spi = ctl.levels[("video", "")].sas[0].params.spi
    (dg,) = ctl.rekey("video", remove=(old_spi,))
    m.receive_datagram(dg, T0)
    assert old_spi not in [sa.spi for sa in install(events(m)).inbound]


# --- gaps and resync -------------------------------------------------------------------------


def test_skipped_msg_id_applies_and_sends_resync():
    ctl, m, _ = registered_member()
    ctl.rekey("video")  # msg 2 lost
    (dg3,) = ctl.rekey("video")
    m.receive_datagram(dg3, T0)
    evs = events(m)
    assert [e.why for e in of(evs, ResyncRequested)] == ["msg-id-gap"]
    assert m.messages_to_send() == [Resync("video", "", 1)]
    assert m.levels[("video", "")].msg_id == 3


def test_heartbeat_with_newer_msg_id_sends_resync():
    ctl, m, _ = registered_member()
    ctl.rekey("video")  # lost
    m.receive_datagram(ctl.heartbeat("video"), T0)
    assert [e.why for e in of(events(m), ResyncRequested)] == ["heartbeat-gap"]
    assert m.messages_to_send() == [Resync("video", "", 1)]


def test_heartbeat_with_current_msg_id_is_quiet_and_older_one_is_replayed():
    ctl, m, _ = registered_member()
    m.receive_datagram(ctl.heartbeat("video"), T0)
    assert m.messages_to_send() == []
    assert m.counters["heartbeats"] == 1
    m.receive_datagram(ctl.heartbeat("video", msg_id=0), T0)
    assert m.rejected == {"replayed": 1}


def test_resync_is_not_repeated_until_retry_then_reply_replaces_state():
    ctl, m, _ = registered_member()
    ctl.rekey("video")
    ctl.rekey("video", new_kek=True)
    m.receive_datagram(ctl.heartbeat("video"), T0)  # under the new KEK: unknown epoch
    m.receive_datagram(ctl.heartbeat("video"), T0 + 0.1)
    assert m.messages_to_send() == [Resync("video", "", 1)]
    m.handle_timer(T0 + RESYNC_RETRY + 0.01)
    assert m.messages_to_send() == [Resync("video", "", 1)]
    events(m)
    m.receive_message(ResyncReply(ctl.grant("video").to_wire()), T0 + 6)
    evs = events(m)
    st_ = m.levels[("video", "")]
    assert (st_.msg_id, st_.kek_epoch) == (3, 2)
    first, second, third = 0x1001, 0x1002, 0x1003
    # the grant lists `second` with a DTD already past (controller time 1003 < 1006): dropped;
    # `first`, which the grant no longer lists, stays until our own DTD; `third` is current
    assert {sa.spi for sa in install(evs).inbound} == {first, third}
    assert second not in {sa.spi for sa in m.install_for(("video", ""), T0 + 6).inbound}
    m.handle_timer(T0 + 6 + 0.5)
    assert m.messages_to_send() == [Ack("video", "", 3, 2)]
    m.receive_datagram(ctl.heartbeat("video"), T0 + 7)  # now decryptable and current
    assert m.messages_to_send() == []


def test_resync_reply_for_a_level_we_do_not_hold_is_refused():
    ctl, m, _ = registered_member()
    ctl.add_group("audio", dst="239.1.1.2")
    with pytest.raises(RemoteProtocolError):
        m.receive_message(ResyncReply(ctl.grant("audio").to_wire()), T0)


def test_silent_rekey_channel_triggers_resync_over_tls():
    ctl, m, _ = registered_member()
    m.receive_datagram(ctl.heartbeat("video"), T0)
    events(m)
    m.handle_timer(T0 + SILENCE * 10.0 + 0.01)
    assert [e.why for e in of(events(m), ResyncRequested)] == ["heartbeat-missing"]


# --- acks, keepalive ----------------------------------------------------------------------------


def test_ack_is_sent_after_the_jitter_delay_with_epoch():
    ctl, m, _ = registered_member(ack_jitter=0.5)
    (dg,) = ctl.rekey("video")
    m.receive_datagram(dg, T0)
    assert m.messages_to_send() == []
    assert m.get_timer() == pytest.approx(T0 + 0.5)
    m.handle_timer(T0 + 0.49)
    assert m.messages_to_send() == []
    m.handle_timer(T0 + 0.5)
    assert m.messages_to_send() == [Ack("video", "", 2, 1)]


def test_two_rekeys_before_the_ack_collapse_into_one_ack():
    ctl, m, _ = registered_member(ack_jitter=0.5)
    for dg in ctl.rekey("video") + ctl.rekey("video"):
        m.receive_datagram(dg, T0)
    m.handle_timer(T0 + 1)
    assert m.messages_to_send() == [Ack("video", "", 3, 1)]


def test_keepalive_ping_pong_and_timeout():
    _, m, _ = registered_member()
    t = m.get_timer()
    assert t == pytest.approx(T0 + 15.0)
    m.handle_timer(t)
    (ping,) = m.messages_to_send()
    assert isinstance(ping, Ping)
    m.receive_message(Pong(ping.nonce + 1), t + 1)  # wrong nonce: ignored
    m.receive_message(Pong(ping.nonce), t + 1)
    assert m.get_timer() == pytest.approx(t + 1 + 15.0)
    m.handle_timer(t + 16)
    m.messages_to_send()
    m.handle_timer(t + 16 + 10.0)
    assert of(events(m), KeepaliveTimeout)


# --- reconnects -------------------------------------------------------------------------------


def test_connection_loss_keeps_installed_sas_and_register_reports_known_ids():
    ctl, m, _ = registered_member("sender")
    (dg,) = ctl.rekey("video")
    m.receive_datagram(dg, T0)
    events(m)
    m.connection_lost(T0 + 1)
    assert events(m) == []  # nothing removed from the data path
    assert len(m.install_for(("video", ""), T0 + 1).inbound) == 2
    m.connect(T0 + 2)
    (reg,) = m.messages_to_send()
    assert reg.known == {"video/": 2}


def test_reregistration_keeps_sas_missing_from_grant_until_dtd():
    ctl, m, _ = registered_member("receiver")
    old_spi = ctl.levels[("video", "")].sas[0].params.spi
    m.connection_lost(T0)
    # while we were away the controller rolled over and forgot the old SA
    ctl.levels[("video", "")].sas = [type(ctl.levels[("video", "")].sas[0])(ctl.sa("video"), "in", ctl.now)]
    ctl.levels[("video", "")].msg_id = 5
    m.connect(T0 + 1)
    m.messages_to_send()
    m.receive_message(ctl.registered(ctl.grant("video")), T0 + 1)
    inst = install(events(m))
    assert old_spi in [sa.spi for sa in inst.inbound]
    assert len(inst.inbound) == 2
    dtd = ctl.levels[("video", "")].policy.dtd
    m.handle_timer(T0 + 1 + dtd + 0.01)
    assert old_spi not in [sa.spi for sa in install(events(m)).inbound]


def test_reregistration_without_a_level_removes_it():
    ctl, m, _ = registered_member(groups=("video", "audio"))
    m.connection_lost(T0)
    m.connect(T0 + 1)
    m.messages_to_send()
    m.receive_message(ctl.registered(ctl.grant("video")), T0 + 1)
    assert of(events(m), GroupRemoved) == [GroupRemoved(("audio", ""))]


def test_statistics_show_sas_without_keys():
    ctl, m, _ = registered_member("sender")
    stats = m.statistics(T0)
    (g,) = stats["groups"]
    assert g["group"] == "video"
    assert g["role"] == "sender"
    assert g["kek_epoch"] == 1
    assert g["sas"][0]["spi"] == ctl.levels[("video", "")].sas[0].params.spi
    text = repr(stats)
    assert ctl.levels[("video", "")].kek.hex() not in text
    assert repr(ctl.levels[("video", "")].sas[0].params.enc_key) not in text


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_datagrams_never_raise(data):
    ctl = FakeController()
    ctl.add_group("video")
    m = MemberProtocol([GroupRequest("video", "receiver")])
    m.connect(T0)
    m.receive_message(ctl.registered(ctl.grant("video")), T0)
    m.receive_datagram(data, T0)
    assert sum(m.rejected.values()) == 1


def test_unsolicited_grant_after_eviction_moves_to_the_new_kek():
    """Eviction: the controller pushes a fresh grant (new KEK) over TLS, then rekeys under it."""
    ctl, m, _ = registered_member()
    lv = ctl.levels[("video", "")]
    lv.kek_epoch, lv.kek = 2, os.urandom(32)  # never sent under the old KEK
    m.receive_message(ResyncReply(ctl.grant("video").to_wire()), T0)
    (dg,) = ctl.rekey("video")
    m.receive_datagram(dg, T0 + 0.1)
    assert [e.msg_id for e in of(events(m), RekeyApplied)] == [1, 2]
    assert m.levels[("video", "")].kek_epoch == 2


def test_per_sender_outbound_follows_the_owner_list():
    ctl = FakeController()
    lv = ctl.add_group("video", sender_policy="per-sender")
    other, mine = ctl.sa("video"), ctl.sa("video")
    import dataclasses

    other, mine = (dataclasses.replace(p, sender_id_bits=0) for p in (other, mine))
    from groupsec.protocol.messages import SAGrant

    lv.sas = [SAGrant(other, "in", ctl.now - 1), SAGrant(mine, "in", ctl.now - 1)]
    m = MemberProtocol([GroupRequest("video", "sender")], jitter=no_jitter)
    m.connect(T0)
    grant = ctl.grant("video", "sender", sender_id=3)
    grant = type(grant)(grant.policy, grant.role, grant.sas, grant.kek_epoch, grant.kek, grant.msg_id, 3,
                        extra={"owners": [[other.spi, 2], [mine.spi, 3]]})
    m.receive_message(ctl.registered(grant), T0)
    inst = install(events(m))
    assert inst.outbound.spi == mine.spi
    assert {sa.spi for sa in inst.inbound} == {other.spi, mine.spi}


def test_acks_and_resyncs_wait_for_a_session():
    ctl, m, _ = registered_member(ack_jitter=0.5)
    (dg,) = ctl.rekey("video")
    m.connection_lost(T0)
    m.receive_datagram(dg, T0)  # multicast still works while the TLS session is down
    ctl.rekey("video")
    (dg3,) = ctl.rekey("video")
    m.receive_datagram(dg3, T0)
    m.handle_timer(T0 + 1)
    assert m.messages_to_send() == []
    t = m.get_timer()
    assert t is None or t > T0 + 1  # no timer left in the past: the shell's loop would spin
    assert m.levels[("video", "")].msg_id == 4
