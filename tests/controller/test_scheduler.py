"""The rekey scheduler under a MockClock: TEK rollovers ahead of expiry, KEK rollovers,
heartbeats, and a group level rekeyed alone."""

from __future__ import annotations

import tomllib

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.controller.app import ControllerApp
from groupsec.controller.config import parse_config
from groupsec.controller.rekey import RekeyScheduler
from groupsec.controller.store import MemoryStore
from groupsec.protocol.rekey import Reassembler, open_rekey_untrusted

CONFIG = """
[controller]
heartbeat_interval = 10.0
[groups.video]
dst = "239.1.1.1"
rekey_channel = "239.1.1.255:7500"
tek_lifetime = 100
kek_lifetime = 250
atd = 2.0
dtd = 3.0
[groups.tv]
dst = "239.3.3.3"
rekey_channel = "239.3.3.255:7501"
tek_lifetime = 1000
[groups.tv.levels.hd]
[groups.tv.levels.sd]
"""


def _app():
    app = ControllerApp(parse_config(tomllib.loads(CONFIG)), MemoryStore(), Ed25519PrivateKey.generate(),
                        clock=trio.current_time)
    sent: list[tuple[tuple[str, str], bytes]] = []
    app.multicast = lambda lc, dg: sent.append((lc.key, dg))
    app.start()
    return app, sent


@pytest.fixture
def mock_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_schedule_tek_kek_and_heartbeats(mock_clock, nursery):
    app, sent = _app()
    await nursery.start(RekeyScheduler(app).run)
    keks = {1: app.manager.state("video", "")["keks"][1]}
    vk = [app.signing_key.public_key()]
    reasm = Reassembler()
    rekeys, heartbeats = [], []
    t_end = trio.current_time() + 505
    while trio.current_time() < t_end:
        await trio.sleep(1)
        while sent:
            key, dg = sent.pop(0)
            if key != ("video", ""):
                continue
            m = reasm.add(open_rekey_untrusted(dg, vk, keks), 0.0)
            if m is None:
                continue
            if m.kind == "heartbeat":
                heartbeats.append((trio.current_time(), m.msg_id))
                continue
            rekeys.append((trio.current_time(), m))
            if m.new_kek is not None:
                keks[m.new_kek_epoch] = m.new_kek
    # a TEK rollover every tek_lifetime, ATD+DTD before the old generation's activation ends
    # (activation + TEK lifetime - ATD - DTD): the next SAs are active when the old ones would expire;
    # a KEK rollover (at kek_created + kek_lifetime) also starts a new TEK generation
    assert [round(m.time, 3) for _, m in rekeys] == [95.0, 192.0, 250.0, 347.0, 444.0, 500.0]
    assert [m.msg_id for _, m in rekeys] == list(range(1, len(rekeys) + 1))
    kek_msgs = [m for _, m in rekeys if m.new_kek is not None]
    assert [m.new_kek_epoch for m in kek_msgs] == [2, 3]  # at 250 and 500
    for _, m in rekeys:
        new = max(m.sas, key=lambda s: s.activate_at)
        assert new.activate_at - m.time == 2.0  # ATD
    assert len(heartbeats) >= 45
    assert all(mid <= len(rekeys) for _, mid in heartbeats)
    # the tv levels have their own message IDs and were not rekeyed by video's schedule
    assert app.manager.state("tv", "hd")["msg_id"] == 0
    assert app.manager.state("tv", "sd")["msg_id"] == 0


async def test_operator_rekey_of_one_level_only(mock_clock):
    app, _ = _app()
    before = {lv: app.manager.state("tv", lv)["gens"][-1]["group_sa"]["spi"] for lv in ("hd", "sd")}
    [plan] = app.rekey_now("tv", "hd")
    assert (plan.level, plan.msg_id) == ("hd", 1)
    assert app.manager.state("tv", "sd")["gens"][-1]["group_sa"]["spi"] == before["sd"]
    assert app.manager.state("tv", "hd")["gens"][-1]["group_sa"]["spi"] != before["hd"]
