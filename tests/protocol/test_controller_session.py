"""The controller session state machine and the group manager, in memory: no sockets, a
fake clock, a MemoryStore. Every message type and every error path."""

from __future__ import annotations

import tomllib

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.controller.app import ControllerApp, SessionHandle
from groupsec.controller.config import parse_config
from groupsec.controller.store import MemoryStore
from groupsec.protocol.controller import ControllerSession
from groupsec.protocol.framing import MAX_FRAME, FrameDecoder, encode_frame
from groupsec.protocol.messages import (
    Ack,
    Bye,
    Error,
    Grant,
    Ping,
    Pong,
    Register,
    Registered,
    RekeyPush,
    Resync,
    ResyncReply,
    decode_message_untrusted,
)
from groupsec.protocol.rekey import open_rekey_untrusted

CONFIG = """
[groups.video]
dst = "239.1.1.1"
rekey_channel = "239.1.1.255:7500"
tek_lifetime = 100
atd = 1.0
dtd = 2.0
[groups.tv]
dst = "239.3.3.3"
rekey_channel = "239.3.3.255:7501"
[groups.tv.levels.hd]
suite = "aes-gcm-16-256"
[groups.tv.levels.sd]
port = 6002
[groups.plant]
dst = "239.1.1.1"
sender_policy = "per-sender"
rekey_channel = "239.2.2.255:7502"
"""


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def env():
    clock = Clock()
    store = MemoryStore()
    app = ControllerApp(parse_config(tomllib.loads(CONFIG)), store, Ed25519PrivateKey.generate(), clock=clock)
    sent: list[tuple[str, bytes]] = []
    app.multicast = lambda lc, dg: sent.append((lc.group, dg))
    for name, groups in {"alice": [["video", "sender", ""], ["video", "receiver", ""]],
                         "bob": [["video", "receiver", ""]],
                         "carol": [["tv", "receiver", "sd"]],
                         "dave": [["tv", "receiver", ""], ["plant", "sender", ""]],
                         "erin": [["plant", "sender", ""], ["plant", "receiver", ""]],
                         "frank": [["plant", "receiver", ""]]}.items():
        store.commit({f"member/{name}": {"name": name, "groups": groups, "revoked": False, "serials": [],
                                         "datapath": "any"}})
    app.start()
    return app, clock, sent


class Peer:
    """The member end of one in-memory session."""

    def __init__(self, app: ControllerApp, name: str, serial: int | None = None) -> None:
        self.app = app
        self.s = ControllerSession(name, serial, app, app.clock(), register_timeout=10, idle_timeout=60)
        self.h = SessionHandle(self.s, lambda: None)
        self.dec = FrameDecoder()

    def send(self, msg, now: float = 0.0) -> list:
        return self.send_raw(encode_frame(msg.encode()), now)

    def send_raw(self, data: bytes, now: float = 0.0) -> list:
        before = self.s.state
        self.s.receive_data(data, now)
        if before != self.s.state and self.s.state == "registered":
            self.h.roles = self.s.roles
            self.app.add_session(self.h)
        return self.recv()

    def recv(self) -> list:
        self.dec.feed(self.s.data_to_send())
        out = []
        while (f := self.dec.next_frame()) is not None:
            out.append(decode_message_untrusted(f))
        return out

    def register(self, *reqs: tuple[str, str, str]) -> list:
        return self.send(Register(1, [{"group": g, "role": r, "level": lv} for g, r, lv in reqs]))


def _grants(reply) -> list[Grant]:
    assert isinstance(reply, Registered), reply
    return reply.grant_objects()


def test_sender_gets_outbound_with_sender_id_and_receiver_only_inbound(env):
    app, _, _ = env
    [a] = Peer(app, "alice").register(("video", "sender", ""), ("video", "receiver", ""))
    [ga] = _grants(a)
    assert ga.role == "sender"
    assert ga.sender_id == 1
    assert sorted(s.direction for s in ga.sas) == ["in", "out"]
    out = next(s for s in ga.sas if s.direction == "out")
    assert out.params.sender_id == 1
    assert out.params.sender_id_bits == 8
    assert a.rekey_public_key == app.public_key
    assert ga.msg_id == 0
    assert ga.kek_epoch == 1
    [b] = Peer(app, "bob").register(("video", "receiver", ""))
    [gb] = _grants(b)
    assert gb.role == "receiver"
    assert gb.sender_id is None
    assert [s.direction for s in gb.sas] == ["in"]
    assert gb.sas[0].params.sender_id is None
    assert gb.sas[0].params.enc_key == out.params.enc_key  # the same group SA
    assert gb.kek == ga.kek


def test_receiver_asking_to_send_gets_only_what_it_may(env):
    app, _, _ = env
    p = Peer(app, "bob")
    [e] = p.register(("video", "sender", ""))
    assert isinstance(e, Error)
    assert e.code == "not-authorized"
    assert p.s.closed
    # asking for both: the intersection (receiver only) is granted
    [r] = Peer(app, "bob").register(("video", "sender", ""), ("video", "receiver", ""))
    [g] = _grants(r)
    assert g.role == "receiver"
    assert all(s.direction == "in" for s in g.sas)
    assert g.sender_id is None


def test_level_member_gets_no_other_level_key(env):
    app, _, _ = env
    [r] = Peer(app, "carol").register(("tv", "receiver", ""))
    grants = _grants(r)
    assert [g.policy.level for g in grants] == ["sd"]
    hd = app.manager.grant("dave", app.config.levels[("tv", "hd")], {"receiver"})
    hd_keys = {s.params.enc_key for s in hd.sas} | {hd.kek}
    assert not hd_keys & ({s.params.enc_key for s in grants[0].sas} | {grants[0].kek})
    [e] = Peer(app, "carol").register(("tv", "receiver", "hd"))
    assert e.code == "not-authorized"
    [r2] = Peer(app, "dave").register(("tv", "receiver", ""))
    assert sorted(g.policy.level for g in _grants(r2)) == ["hd", "sd"]


def test_unknown_group_unknown_member_revoked(env):
    app, _, _ = env
    [e] = Peer(app, "alice").register(("nope", "receiver", ""))
    assert e.code == "unknown-group"
    [e] = Peer(app, "alice").register(("tv", "receiver", "uhd"))
    assert e.code == "unknown-group"
    [e] = Peer(app, "mallory").register(("video", "receiver", ""))
    assert e.code == "not-authorized"
    app.store.commit({"revoked/ABC": {"name": "bob"}})
    [e] = Peer(app, "bob", serial=0xABC).register(("video", "receiver", ""))
    assert e.code == "revoked"
    assert app.counters["refused-revoked"] == 1


def test_version_malformed_oversize_and_wrong_state(env):
    app, _, _ = env
    [e] = Peer(app, "bob").send(Register(2, [{"group": "video", "role": "receiver"}]))
    assert e.code == "unsupported-version"
    [e] = Peer(app, "bob").send_raw(encode_frame(b"\xc1garbage"))
    assert e.code == "bad-message"
    [e] = Peer(app, "bob").send_raw(encode_frame(msgpack.packb({"t": "register", "version": 1, "groups": [7]})))
    assert e.code == "bad-message"
    [e] = Peer(app, "bob").send_raw((MAX_FRAME + 1).to_bytes(4, "big") + b"x" * 100)
    assert e.code == "frame-too-large"
    for first in (Ack("video", "", 1, 1), Resync("video", "", 0), Ping(1), RekeyPush(b"x"), Registered(
            "x", [], b"k" * 32, 0.0, 1.0)):
        p = Peer(app, "bob")
        [e] = p.send(first)
        assert e.code == "unexpected-message", first
        assert p.s.closed
    p = Peer(app, "bob")
    p.register(("video", "receiver", ""))
    [e] = p.register(("video", "receiver", ""))  # a second Register
    assert e.code == "unexpected-message"
    assert p.send(Ping(1)) == []  # closed: nothing more


def test_ping_ack_resync_bye_and_session_bounds(env):
    app, _clock, _ = env
    p = Peer(app, "bob")
    p.register(("video", "receiver", ""))
    assert p.send(Ping(42)) == [Pong(42)]
    assert p.send(Pong(1)) == []
    assert p.send(Ack("video", "", 0, 1)) == []
    assert app.acks["bob"]["video/"]["how"] == "ack"
    [rr] = p.send(Resync("video", "", 0))
    assert isinstance(rr, ResyncReply)
    assert Grant.from_wire_untrusted(rr.grant).role == "receiver"
    [e] = p.send(Resync("tv", "sd", 0))
    assert e.code == "not-authorized"  # a level this session does not hold
    q = Peer(app, "bob")
    q.register(("video", "receiver", ""))
    assert q.send(Bye("done")) == []
    assert q.s.closed


def test_register_and_idle_timeouts(env):
    app, _, _ = env
    p = Peer(app, "bob")
    assert p.s.get_timer() == pytest.approx(app.clock() + 10)
    p.s.handle_timer(app.clock() + 11)
    [e] = p.recv()
    assert e.code == "bad-message"
    q = Peer(app, "bob")
    q.register(("video", "receiver", ""))
    q.send(Ping(1), now=5.0)
    assert q.s.get_timer() == 65.0
    q.s.handle_timer(64.0)
    assert not q.s.closed
    q.s.handle_timer(65.0)
    assert q.recv() == [Bye("idle-timeout")]
    assert q.s.closed


def test_rollover_atd_dtd_and_push(env):
    app, clock, sent = env
    lc = app.config.levels[("video", "")]
    b = Peer(app, "bob")
    [r] = b.register(("video", "receiver", ""))
    [g0] = _grants(r)
    old_spi = g0.sas[0].params.spi
    assert app.manager.next_rollover_at(lc) == pytest.approx(1000 + 100 - 3)
    clock.t = 1097.0
    plan = app.manager.rollover(lc, clock.t)
    assert app.send_plan(plan) == 1
    pushes = b.recv()
    assert len(pushes) == 1
    msg = open_rekey_untrusted(pushes[0].datagram, [app.signing_key.public_key()], {1: g0.kek})
    assert msg.msg_id == 1
    assert sent[-1] == ("video", pushes[0].datagram)  # the same bytes went to the multicast channel
    by_spi = {s.params.spi: s for s in msg.sas}
    new = next(s for spi, s in by_spi.items() if spi != old_spi)
    assert new.activate_at == pytest.approx(1098.0)  # now + ATD
    assert by_spi[old_spi].deactivate_at == pytest.approx(1100.0)  # activation + DTD
    # after the old generation's DTD it is pruned at the next rollover, its SPI never reused
    clock.t = 1200.0
    app.send_plan(app.manager.rollover(lc, clock.t))
    gens = app.manager.state("video", "")["gens"]
    assert old_spi not in [s for g in app.manager.summary()[0]["generations"] for s in g["spis"]]
    assert len(gens) == 2
    assert f"spi/239.1.1.1/{old_spi:08x}" in dict(app.store.scan("spi/"))


def test_spis_unique_per_destination_and_never_reserved(env):
    app, clock, _ = env
    lc_v, lc_p = app.config.levels[("video", "")], app.config.levels[("plant", "")]
    for _ in range(30):
        clock.t += 1
        app.manager.rollover(lc_v, clock.t)
        app.manager.rollover(lc_p, clock.t)
    spis = [int(k.rsplit("/", 1)[1], 16) for k, _ in app.store.scan("spi/239.1.1.1/")]
    assert len(spis) == len(set(spis)) >= 31
    assert min(spis) >= 256


def test_per_sender_sas_and_owners(env):
    app, _, _ = env
    f = Peer(app, "frank")
    [r] = f.register(("plant", "receiver", ""))
    assert _grants(r)[0].sas == ()  # no sender yet
    [r] = Peer(app, "erin").register(("plant", "sender", ""), ("plant", "receiver", ""))
    [ge] = _grants(r)
    outs = [s for s in ge.sas if s.direction == "out"]
    assert len(outs) == 1
    assert outs[0].params.sender_id_bits == 0
    assert ge.extra["owners"] == [[outs[0].params.spi, ge.sender_id]]
    # the receiver learnt of the new sender's SA by a rekey push
    [push] = f.recv()
    msg = open_rekey_untrusted(push.datagram, [app.signing_key.public_key()], {1: _grants(r)[0].kek})
    assert [s.params.spi for s in msg.sas] == [outs[0].params.spi]
    [r] = Peer(app, "dave").register(("plant", "sender", ""))
    [gd] = _grants(r)
    assert [s.direction for s in gd.sas] == ["out"]  # a sender-only member: its own SA only
    assert gd.sas[0].params.spi != outs[0].params.spi
    assert gd.sas[0].params.enc_key != outs[0].params.enc_key


def test_eviction_new_kek_per_member_then_teks_under_it(env):
    app, _clock, sent = env
    a, b = Peer(app, "alice"), Peer(app, "bob")
    [_ra] = a.register(("video", "sender", ""), ("video", "receiver", ""))
    [rb] = b.register(("video", "receiver", ""))
    old_kek = _grants(rb)[0].kek
    n_sent = len(sent)
    assert app.revoke("alice") == 1
    [e] = a.recv()
    assert e.code == "revoked"
    assert a.s.closed
    assert a.recv() == []  # the evicted member gets nothing new
    rr, push = b.recv()
    g = Grant.from_wire_untrusted(rr.grant)
    assert g.kek_epoch == 2
    assert g.kek != old_kek
    msg = open_rekey_untrusted(push.datagram, [app.signing_key.public_key()], {2: g.kek})
    assert msg.kek_epoch == 2
    assert msg.new_kek is None  # the new KEK never travels under the old one
    assert msg.revoked_senders == (1,)
    with pytest.raises(Exception, match="epoch"):
        open_rekey_untrusted(push.datagram, [app.signing_key.public_key()], {1: old_kek})
    for _, dg in sent[n_sent:]:
        assert g.kek not in dg
    [e] = Peer(app, "alice").register(("video", "receiver", ""))
    assert e.code == "revoked"
    assert app.manager.state("video", "")["sender_ids"] == {}


def test_kek_rollover_inline_and_crash_resume(env):
    app, clock, _sent = env
    lc = app.config.levels[("video", "")]
    plan = app.manager.rollover(lc, clock.t, new_kek_inline=True)
    st = app.manager.state("video", "")
    assert st["kek_epoch"] == 2
    # a fresh app on the same store (a restart): same msg_id, same KEK for epoch 2, last rekey resent
    app2 = ControllerApp(app.config, app.store, app.signing_key, clock=clock)
    resent: list[bytes] = []
    app2.multicast = lambda lc, dg: resent.append(dg)
    app2.start()
    st2 = app2.manager.state("video", "")
    assert st2["keks"][2] == st["keks"][2]
    assert st2["msg_id"] == plan.msg_id
    m = open_rekey_untrusted(resent[0], [app.signing_key.public_key()], {1: st["keks"][1]})
    assert m.msg_id == plan.msg_id
    assert m.new_kek == st["keks"][2]


def test_leaving_one_level_rekeys_it_and_keeps_the_other(env):
    app, _, _ = env
    d, c = Peer(app, "dave"), Peer(app, "carol")
    [r] = d.register(("tv", "receiver", ""))
    old = {g.policy.level: g for g in _grants(r)}
    c.register(("tv", "receiver", "sd"))
    rec = app.store.get("member/dave")
    rec["groups"] = [["tv", "receiver", "sd"], ["plant", "sender", ""]]  # `groupsec member set`: downgrade
    app.store.commit({"member/dave": rec})
    assert app.reload_member("dave", [["tv", "hd"]]) == 1
    assert not d.s.closed
    assert d.s.levels == {("tv", "sd")}
    assert d.recv() == []  # nothing of the new hd state reaches dave
    hd = app.manager.state("tv", "hd")
    assert hd["kek_epoch"] == 2
    assert hd["keks"][2] != old["hd"].kek
    assert app.manager.state("tv", "sd")["kek_epoch"] == 1  # sd untouched, dave keeps it
    assert c.recv() == []  # carol is not in hd: no push for her either
    [rr] = d.send(Resync("tv", "sd", 0))
    assert Grant.from_wire_untrusted(rr.grant).kek == old["sd"].kek
    [e] = d.send(Resync("tv", "hd", 0))
    assert e.code == "not-authorized"
