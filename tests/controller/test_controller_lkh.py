"""Key-tree (LKH) levels in the controller, in memory with the member state machine: the
grant carries each member's path, eviction is ONE multicast tree rekey that the remaining
members converge from (no Resync, no unicast), batch eviction, backward access control, the
scheduled KEK rollover, config validation, and the tree surviving a kill -9 mid-eviction."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.controller.app import ControllerApp, SessionHandle
from groupsec.controller.config import parse_config
from groupsec.controller.groups import RekeyPlan
from groupsec.controller.store import MemoryStore, SQLiteStore
from groupsec.errors import BadRekey, ConfigError
from groupsec.keys.lkh import MemberKeyState, MemberPath, RekeyMessage
from groupsec.protocol.controller import ControllerSession
from groupsec.protocol.framing import FrameDecoder, encode_frame
from groupsec.protocol.member import MemberProtocol
from groupsec.protocol.messages import GroupRequest, RekeyPush, decode_message_untrusted
from groupsec.protocol.rekey import open_rekey_untrusted

REPO = Path(__file__).resolve().parents[2]
KEY = ("video", "")


def config_text(extra: str = "") -> str:
    return textwrap.dedent(f"""
        [groups.video]
        dst = "239.1.1.1"
        rekey_channel = "239.1.1.255:7500"
        tek_lifetime = 100
        atd = 1.0
        dtd = 2.0
        key_tree = "lkh"
        {extra}
        """)


class Clock:
    t = 5000.0

    def __call__(self) -> float:
        return self.t


class Link:
    """One member state machine on an in-memory session. ``unicast=False`` drops the
    controller's RekeyPush frames, so only the multicast path (``deliver``) reaches it."""

    def __init__(self, app: ControllerApp, name: str, role: str = "receiver", unicast: bool = False) -> None:
        self.app, self.name, self.unicast = app, name, unicast
        self.ctl = ControllerSession(name, None, app, app.clock())
        self.handle = SessionHandle(self.ctl, lambda: None)
        self.member = MemberProtocol([GroupRequest("video", role)], ack_jitter=0.0, jitter=lambda x: 0.0)
        self.dec = FrameDecoder()
        self.member.connect(app.clock())
        self.pump()

    def pump(self) -> None:
        now = self.app.clock()
        for _ in range(20):
            moved = False
            for msg in self.member.messages_to_send():
                before = self.ctl.state
                self.ctl.receive_data(encode_frame(msg.encode()), now)
                if before != self.ctl.state and self.ctl.state == "registered":
                    self.handle.roles = self.ctl.roles
                    self.app.add_session(self.handle)
                moved = True
            self.dec.feed(self.ctl.data_to_send())
            while (f := self.dec.next_frame()) is not None:
                msg = decode_message_untrusted(f)
                if self.member.state == "closed" or (isinstance(msg, RekeyPush) and not self.unicast):
                    continue
                self.member.receive_message(msg, now)
                moved = True
            if not moved:
                return

    def deliver(self, datagrams: list[bytes]) -> None:
        for dg in datagrams:
            self.member.receive_datagram(dg, self.app.clock(), "multicast")
        self.pump()

    @property
    def level(self):
        return self.member.levels[KEY]


def make_app(extra: str = "", store=None, names=("a", "b", "c", "d", "e")) -> tuple[ControllerApp, list[bytes],
                                                                                     list[RekeyPlan]]:
    store = store if store is not None else MemoryStore()
    app = ControllerApp(parse_config(tomllib.loads(config_text(extra))), store, Ed25519PrivateKey.generate(),
                        clock=Clock())
    for n in names:
        if store.get(f"member/{n}") is None:
            store.commit({f"member/{n}": {"name": n, "groups": [["video", "receiver", ""]], "revoked": False,
                                          "serials": [], "datapath": "any"}})
    wire: list[bytes] = []
    plans: list[RekeyPlan] = []
    app.multicast = lambda lc, dg: wire.append(dg)
    app.rekey_listeners.append(plans.append)
    app.start()
    return app, wire, plans


def join_all(app: ControllerApp, wire: list[bytes], names, **kw) -> dict[str, Link]:
    """Register ``names`` in order and multicast every datagram so far to all of them (a join
    that splits a leaf sends a tree rekey the earlier members need)."""
    links = {n: Link(app, n, **kw) for n in names}
    for link in links.values():
        link.deliver(list(wire))
    return links


def tree_kind_plans(plans: list[RekeyPlan]) -> list[RekeyPlan]:
    return [p for p in plans if p.kind == "lkh"]


def test_registration_gives_each_member_its_own_path_ending_at_the_kek():
    app, wire, _plans = make_app()
    links = join_all(app, wire, "abcde")
    tree = app.manager.trees.get(app.config.levels[KEY])
    st = app.manager.state(*KEY)
    assert sorted(tree.members()) == list("abcde")
    leaves = set()
    for n, link in links.items():
        assert link.member.state == "registered"
        lvl = link.level
        assert lvl.lkh is not None
        # the member holds exactly the controller's path for it, and its root is the KEK it was granted
        assert set(lvl.lkh.keys) == set(tree.path_for(n).keys)
        assert lvl.keks[lvl.kek_epoch] == tree.kek == st["keks"][st["kek_epoch"]]
        assert st["kek_epoch"] == st["lkh_base"] + tree.kek_version
        leaves.add(lvl.lkh.leaf_id)
    assert len(leaves) == 5
    # the grant carries the path encoded on the wire (extra.lkh_path), for that member only
    g = app.manager.grant("c", app.config.levels[KEY], {"receiver"})
    assert MemberPath.decode_untrusted(g.extra["lkh_path"]) == tree.path_for("c")
    assert g.kek == tree.kek


def test_eviction_is_one_multicast_tree_rekey_and_the_rest_converge_without_resync_or_unicast():
    app, wire, plans = make_app()
    links = join_all(app, wire, "abcde")  # unicast RekeyPush frames are dropped: multicast only
    old_epoch = app.manager.state(*KEY)["kek_epoch"]
    old_kek = links["a"].level.keks[old_epoch]
    wire.clear()
    plans.clear()
    resyncs = app.counters.get("resyncs", 0)
    applied = {n: links[n].member.counters.get("lkh_applied", 0) for n in links}
    app.revoke("c")
    tree_plans = tree_kind_plans(plans)
    assert len(tree_plans) == 1  # ONE tree message for the eviction ...
    assert tree_plans[0].kek_epoch == old_epoch  # ... under the pre-eviction KEK
    assert [p.kind for p in plans] == ["lkh", "rekey"]  # then the new TEKs
    st = app.manager.state(*KEY)
    assert plans[1].kek_epoch == st["kek_epoch"] > old_epoch  # the TEKs travel under the new KEK
    msg = open_rekey_untrusted(wire[0], [app.signing_key.public_key()], {old_epoch: old_kek})
    assert msg.kind == "lkh"
    assert "kek" not in msg.extra
    assert msg.new_kek is None
    assert RekeyMessage.decode_untrusted(msg.extra["lkh"]).wraps  # the tree's wraps instead
    for n in "abde":
        links[n].deliver(wire)
    new_kek = st["keks"][st["kek_epoch"]]
    for n in "abde":
        lvl = links[n].level
        assert lvl.kek_epoch == st["kek_epoch"]
        assert lvl.keks[lvl.kek_epoch] == new_kek
        assert lvl.msg_id == st["msg_id"]
        assert links[n].member.counters["resyncs_sent"] == 0
        assert links[n].member.counters["lkh_applied"] == applied[n] + 1
        newest = st["gens"][-1]["group_sa"]["spi"]
        assert newest in {sa.spi for sa in links[n].member.install_for(KEY, app.clock()).inbound}
    assert app.counters.get("resyncs", 0) == resyncs
    assert app.counters.get("kek-grant-pushes", 0) == 0
    # the evicted member gets the same bytes and derives nothing
    evicted = links["c"]
    evicted.member.state = "registered"  # as if its session were still up (the controller closed it)
    evicted.deliver(wire)
    assert evicted.member.counters["lkh_evicted"] == 1
    assert evicted.member.rejected["lkh-cannot-derive"] == 1
    assert new_kek not in evicted.level.keks.values()
    assert evicted.level.kek_epoch == old_epoch


def test_batch_eviction_is_one_tree_message_and_no_evicted_key_opens_it():
    names = [f"m{i}" for i in range(12)]
    app, wire, plans = make_app(names=names)
    links = join_all(app, wire, names)
    held = {n: links[n].level.lkh.to_dict() for n in names}
    old_epoch = app.manager.state(*KEY)["kek_epoch"]
    old_kek = links["m0"].level.keks[old_epoch]
    wire.clear()
    plans.clear()
    gone = ["m1", "m4", "m5", "m9"]
    assert app.revoke_many(gone) == 1
    assert len(tree_kind_plans(plans)) == 1
    assert len([p for p in plans if p.kind == "rekey"]) == 1
    tree_dg = open_rekey_untrusted(wire[0], [app.signing_key.public_key()], {old_epoch: old_kek})
    tree_msg = RekeyMessage.decode_untrusted(tree_dg.extra["lkh"])
    for n in names:
        if n not in gone:
            links[n].deliver(wire)
    st = app.manager.state(*KEY)
    kek = st["keks"][st["kek_epoch"]]
    for n in names:
        if n not in gone:
            assert links[n].level.keks[st["kek_epoch"]] == kek
            assert links[n].member.counters["resyncs_sent"] == 0
    # collusion: every key the evicted members ever held, pooled, opens no wrap of the message
    pooled = {(i, v) for n in gone for i, v, _k in held[n]["keys"]}
    assert not any((w.wrapping_id, w.wrapping_version) in pooled for w in tree_msg.wraps)
    for n in gone:
        with pytest.raises(BadRekey) as exc:
            MemberKeyState.from_dict(held[n]).apply_rekey(tree_msg)
        assert exc.value.reason == "lkh-cannot-derive"
    assert all(n not in app.manager.trees.get(app.config.levels[KEY]) for n in gone)
    for n in gone:
        assert app.manager.member(n)["revoked"]
        assert app.manager.member(n)["evicted"]


def test_missed_tree_rekey_is_recovered_by_resync_with_a_fresh_path():
    app, wire, _plans = make_app()
    links = join_all(app, wire, "abcde")
    wire.clear()
    app.revoke("e")
    # "a" loses the tree message (the first datagram) and gets only the TEK rollover after it
    links["a"].deliver(wire[1:])
    assert links["a"].member.counters["resyncs_sent"] == 1  # unknown KEK epoch: it asked over TLS
    st = app.manager.state(*KEY)
    lvl = links["a"].level
    assert lvl.kek_epoch == st["kek_epoch"]
    assert lvl.keks[lvl.kek_epoch] == st["keks"][st["kek_epoch"]]
    assert set(lvl.lkh.keys) == set(app.manager.trees.get(app.config.levels[KEY]).path_for("a").keys)
    # and it follows the next eviction from multicast again
    wire.clear()
    app.revoke("d")
    links["a"].deliver(wire)
    st = app.manager.state(*KEY)
    assert links["a"].level.keks[st["kek_epoch"]] == st["keks"][st["kek_epoch"]]
    assert links["a"].member.counters["resyncs_sent"] == 1


def test_backward_access_control_join_refreshes_the_kek_the_newcomer_never_held():
    app, wire, plans = make_app("backward_access_control = true", names=("a", "b", "c", "n"))
    links = join_all(app, wire, "abc")
    before = app.manager.state(*KEY)
    old_epoch, old_kek = before["kek_epoch"], before["keks"][before["kek_epoch"]]
    wire.clear()
    plans.clear()
    newcomer = Link(app, "n")
    assert [p.kind for p in plans] == ["lkh"]  # the join's tree rekey, under the old KEK
    assert plans[0].kek_epoch == old_epoch
    st = app.manager.state(*KEY)
    assert st["kek_epoch"] > old_epoch
    assert old_kek not in newcomer.level.keks.values()
    assert old_kek not in {k.key for k in newcomer.level.lkh.keys}
    with pytest.raises(BadRekey):  # the newcomer cannot read the rekey made for its own join
        open_rekey_untrusted(wire[0], [app.signing_key.public_key()], newcomer.level.keks)
    for n in "abc":
        links[n].deliver(wire)
        assert links[n].level.keks[st["kek_epoch"]] == newcomer.level.keks[st["kek_epoch"]]
        assert links[n].member.counters["resyncs_sent"] == 0


def test_join_without_backward_access_control_keeps_the_kek():
    app, _wire, plans = make_app(names=("a", "b", "c"))
    Link(app, "a")
    epoch = app.manager.state(*KEY)["kek_epoch"]
    for n in "bc":
        Link(app, n)
    assert app.manager.state(*KEY)["kek_epoch"] == epoch
    assert tree_kind_plans(plans) == []  # degree 3: three members fit under the root, no split


def test_scheduled_kek_rollover_refreshes_the_tree_root():
    app, wire, plans = make_app()
    links = join_all(app, wire, "abcde")
    wire.clear()
    plans.clear()
    app.rekey_now("video", kek=True)
    assert [p.kind for p in plans] == ["lkh"]  # new TEKs and the root refresh in one message
    st = app.manager.state(*KEY)
    tree = app.manager.trees.get(app.config.levels[KEY])
    assert st["keks"][st["kek_epoch"]] == tree.kek
    for link in links.values():
        link.deliver(wire)
        assert link.level.keks[st["kek_epoch"]] == tree.kek
        assert link.member.counters["resyncs_sent"] == 0


@pytest.mark.parametrize(("extra", "message"), [
    ('key_tree_degree = 1', "groups.video.key_tree_degree: 1 is not in 2..64"),
    ('backward_access_control = "yes"', "groups.video.backward_access_control: 'yes' is not true/false"),
])
def test_key_tree_config_errors_are_one_line(extra, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(tomllib.loads(config_text(extra)))
    assert str(exc.value) == f"groupsec.toml: {message}"


def test_key_tree_options_need_a_key_tree():
    text = config_text("backward_access_control = true").replace('key_tree = "lkh"', "")
    with pytest.raises(ConfigError, match=r"backward_access_control: applies to key_tree = \"lkh\" only"):
        parse_config(tomllib.loads(text))
    with pytest.raises(ConfigError, match=r"key_tree: 'lhk' is not one of none, lkh"):
        parse_config(tomllib.loads(config_text().replace('"lkh"', '"lhk"')))


CRASH_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_controller_lkh import make_app, join_all, KEY
from groupsec.controller.store import SQLiteStore
app, wire, plans = make_app(store=SQLiteStore({db!r}), names=[f"m{{i}}" for i in range(9)])
links = join_all(app, wire, [f"m{{i}}" for i in range(9)])
import msgpack
open({paths!r}, "wb").write(msgpack.packb({{n: links[n].level.lkh.to_dict() for n in links}}))
def die(plan):  # killed while sending: the eviction is durable, the datagrams are not all out
    os.kill(os.getpid(), signal.SIGKILL)
app.rekey_listeners.append(die)
app.revoke_many(["m2", "m7"])
"""


def test_kill_9_during_an_eviction_restarts_with_the_same_tree_and_kek(tmp_path):
    db, paths = tmp_path / "state.db", tmp_path / "paths.json"
    code = CRASH_CHILD.format(tests=str(Path(__file__).parent), db=str(db), paths=str(paths))
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr[-2000:]
    held = msgpack.unpackb(paths.read_bytes())
    # restart: the same tree (the evicted members are gone), and the resent messages (same
    # msg_ids, the tree rekey first) bring the members' pre-crash keys to the same KEK
    store = SQLiteStore(db)
    try:
        durable = store.get("lkh/video/")
        app, wire, plans = make_app(store=store, names=[])
        tree = app.manager.trees.get(app.config.levels[KEY])
        assert msgpack.packb(tree.to_dict()) == msgpack.packb(durable)
        assert "m2" not in tree
        assert "m7" not in tree
        assert len(tree) == 7
        st = app.manager.state(*KEY)
        assert st["keks"][st["kek_epoch"]] == tree.kek
        assert [p.kind for p in plans] == ["lkh", "rekey"]
        assert [p.msg_id for p in plans] == [st["msg_id"] - 1, st["msg_id"]]
        tree_msg = RekeyMessage.decode_untrusted(plans[0].inner["lkh"])
        for n, d in held.items():
            state = MemberKeyState.from_dict(d)
            if n in ("m2", "m7"):
                with pytest.raises(BadRekey):
                    state.apply_rekey(tree_msg)
            else:
                assert state.apply_rekey(tree_msg) == tree.kek
        assert len(wire) >= 2
        # a second restart changes nothing (no second eviction, no new KEK)
        app2, _w, _p = make_app(store=store, names=[])
        st2 = app2.manager.state(*KEY)
        assert (st2["kek_epoch"], st2["msg_id"]) == (st["kek_epoch"], st["msg_id"])
        assert app2.manager.trees.get(app2.config.levels[KEY]).kek == tree.kek
    finally:
        store.close()


def test_removal_from_a_level_is_one_tree_rekey_and_the_member_keeps_nothing_new():
    app, wire, plans = make_app()
    links = join_all(app, wire, "abcde")
    rec = app.manager.member("b")
    rec["groups"] = []  # `groupsec member set b` took the level away
    app.store.commit({"member/b": rec})
    wire.clear()
    plans.clear()
    assert app.reload_member("b", [["video", ""]]) == 1
    assert [p.kind for p in plans] == ["lkh", "rekey"]
    assert "b" not in app.manager.trees.get(app.config.levels[KEY])
    st = app.manager.state(*KEY)
    for n in "acde":
        links[n].deliver(wire)
        assert links[n].level.keks[st["kek_epoch"]] == st["keks"][st["kek_epoch"]]
    links["b"].deliver(wire)
    assert st["kek_epoch"] not in links["b"].level.keks
