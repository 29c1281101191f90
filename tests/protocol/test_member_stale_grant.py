"""A grant older than what the member holds (a resync reply that crossed a newer multicast
rekey, or an HA follower's lagging copy of the state) must not roll the member back: found by
the HA chaos test (tests/ha/test_ha_chaos.py), where a member went from msg_id 5 / KEK epoch 3
back to msg_id 4 / epoch 2 and then accepted msg_id 5 a second time."""

from __future__ import annotations

from member_helpers import FakeController
from test_member import T0, events, install, no_jitter, registered_member

from groupsec.protocol.member import MemberProtocol, RekeyApplied, RekeyRejected
from groupsec.protocol.messages import GroupRequest, Resync, ResyncReply


def test_resync_reply_older_than_a_rekey_that_overtook_it_is_ignored():
    ctl, m, _ = registered_member()
    stale = ctl.grant("video")  # msg_id 1, epoch 1: what the controller answers our resync with...
    m.receive_datagram(ctl.heartbeat("video"), T0)
    (dg,) = ctl.rekey("video", new_kek=True)  # ...while rekey 2 (new KEK) is already on the wire
    m.receive_datagram(dg, T0 + 0.1)
    newest = {sa.spi for sa in m.install_for(("video", ""), T0 + 0.1).inbound}
    events(m)
    m.receive_message(ResyncReply(stale.to_wire()), T0 + 0.2)
    evs = events(m)
    st = m.levels[("video", "")]
    assert (st.msg_id, st.kek_epoch) == (2, 2)
    assert [e.reason for e in evs if isinstance(e, RekeyRejected)] == ["stale-grant"]
    assert not [e for e in evs if isinstance(e, RekeyApplied)]
    assert 0x1002 in newest  # the rekey's TEK stays installed after the old one's DTD
    assert {sa.spi for sa in m.install_for(("video", ""), T0 + 30).inbound} == {0x1002}
    m.receive_datagram(dg, T0 + 0.3)  # the same rekey once more (e.g. over TLS): still a replay
    assert [e.reason for e in events(m) if isinstance(e, RekeyRejected)] == ["replayed"]


def test_equal_or_newer_grant_still_applies():
    ctl, m, _ = registered_member()
    ctl.rekey("video")
    m.receive_message(ResyncReply(ctl.grant("video").to_wire()), T0 + 1)
    evs = events(m)
    assert [e.msg_id for e in evs if isinstance(e, RekeyApplied)] == [2]
    assert install(evs) is not None
    m.receive_message(ResyncReply(ctl.grant("video").to_wire()), T0 + 2)  # the same state again
    assert [e.msg_id for e in events(m) if isinstance(e, RekeyApplied)] == [2]


def test_stale_registration_grant_keeps_the_newer_state():
    ctl = FakeController()
    ctl.add_group("video")
    m = MemberProtocol([GroupRequest("video", "receiver")], jitter=no_jitter)
    m.connect(T0)
    m.messages_to_send()
    old = ctl.grant("video")
    m.receive_message(ctl.registered(old), T0)
    (dg,) = ctl.rekey("video", new_kek=True)
    m.receive_datagram(dg, T0 + 1)
    m.connection_lost(T0 + 2)
    m.connect(T0 + 3)
    assert m.messages_to_send()[0].known == {"video/": 2}
    m.receive_message(ctl.registered(old), T0 + 3)  # a lagging follower answers with msg_id 1
    st = m.levels[("video", "")]
    assert (st.msg_id, st.kek_epoch) == (2, 2)
    assert m.rejected.get("stale-grant") == 1
    m.receive_datagram(ctl.heartbeat("video"), T0 + 4)  # the leader's heartbeat: current, no resync
    assert not [x for x in m.messages_to_send() if isinstance(x, Resync)]
