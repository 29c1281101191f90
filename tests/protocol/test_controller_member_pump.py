"""The controller session and the member state machine (groupsec.protocol.member) pumped
against each other in memory: registration, a rollover pushed and acknowledged, an
eviction that moves the remaining member to the new KEK. No sockets, a fake clock."""

from __future__ import annotations

import tomllib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.controller.app import ControllerApp, SessionHandle
from groupsec.controller.config import parse_config
from groupsec.controller.store import MemoryStore
from groupsec.protocol.controller import ControllerSession
from groupsec.protocol.framing import FrameDecoder, encode_frame
from groupsec.protocol.member import MemberProtocol
from groupsec.protocol.messages import GroupRequest, decode_message_untrusted

CONFIG = """
[groups.video]
dst = "239.1.1.1"
rekey_channel = "239.1.1.255:7500"
tek_lifetime = 100
atd = 1.0
dtd = 2.0
"""


class Clock:
    t = 5000.0

    def __call__(self) -> float:
        return self.t


class Link:
    def __init__(self, app: ControllerApp, name: str, role: str) -> None:
        self.app = app
        self.ctl = ControllerSession(name, None, app, app.clock())
        self.handle = SessionHandle(self.ctl, lambda: None)
        self.member = MemberProtocol([GroupRequest("video", role)], ack_jitter=0.0, jitter=lambda x: 0.0)
        self.dec = FrameDecoder()
        self.member.connect(app.clock())

    def pump(self) -> None:
        now = self.app.clock()
        for _ in range(10):
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
                self.member.receive_message(decode_message_untrusted(f), now)
                moved = True
            t = self.member.get_timer()
            if t is not None and t <= now:
                self.member.handle_timer(now)
                moved = True
            if not moved:
                return


def test_register_rollover_ack_and_eviction_with_the_member_state_machine():
    clock = Clock()
    store = MemoryStore()
    app = ControllerApp(parse_config(tomllib.loads(CONFIG)), store, Ed25519PrivateKey.generate(), clock=clock)
    for name, role in (("s", "sender"), ("r", "receiver"), ("x", "receiver")):
        store.commit({f"member/{name}": {"name": name, "groups": [["video", role, ""]], "revoked": False,
                                         "serials": [], "datapath": "any"}})
    app.start()
    links = {n: Link(app, n, role) for n, role in (("s", "sender"), ("r", "receiver"), ("x", "receiver"))}
    for link in links.values():
        link.pump()
        assert link.member.state == "registered"
    inst = links["s"].member.install_for(("video", ""), clock.t)
    assert inst.outbound is not None
    assert inst.outbound.sender_id == 1
    assert links["r"].member.install_for(("video", ""), clock.t).outbound is None

    clock.t += 10
    app.rekey_now("video")
    for link in links.values():
        link.pump()
    assert links["r"].member.levels[("video", "")].msg_id == 1
    assert app.acks["r"]["video/"] == {"msg_id": 1, "kek_epoch": 1, "time": clock.t, "how": "ack"}
    assert len(links["r"].member.install_for(("video", ""), clock.t).inbound) == 2
    clock.t += 1.5  # past ATD: the sender switches to the new SA
    links["s"].member.handle_timer(clock.t)
    new_spi = app.manager.state("video", "")["gens"][-1]["group_sa"]["spi"]
    assert links["s"].member.install_for(("video", ""), clock.t).outbound.spi == new_spi

    clock.t += 5
    app.revoke("x")
    for link in links.values():
        link.pump()
    assert links["x"].member.state == "closed"
    st = app.manager.state("video", "")
    for n in ("s", "r"):
        lvl = links[n].member.levels[("video", "")]
        assert lvl.kek_epoch == 2
        assert lvl.keks[2] == st["keks"][2]
    x = links["x"].member.levels[("video", "")]
    assert 2 not in x.keks  # the evicted member never sees the new KEK
    newest = st["gens"][-1]["group_sa"]["spi"]
    assert newest not in {sa.spi for sa in links["x"].member.install_for(("video", ""), clock.t).inbound}
    assert newest in {sa.spi for sa in links["r"].member.install_for(("video", ""), clock.t).inbound}
