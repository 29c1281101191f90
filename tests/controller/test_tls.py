"""Real TLS 1.3 over loopback against the trio server: the right material for each member,
and every kind of bad client refused (with a specific Error when authenticated), logged,
counted, while a good member registers meanwhile."""

from __future__ import annotations

import resource
import ssl
from pathlib import Path

import pytest
import trio
from ctl_helpers import add_member

from groupsec.controller import pki
from groupsec.controller.app import ControllerApp
from groupsec.controller.config import load_config
from groupsec.controller.home import admin_request
from groupsec.controller.loadclient import client_context, connect, register
from groupsec.controller.server import ControllerServer, server_ssl_context
from groupsec.controller.store import SQLiteStore
from groupsec.protocol.framing import encode_frame
from groupsec.protocol.messages import Error, Grant, Register, Registered, RekeyPush, ResyncReply
from groupsec.protocol.rekey import Reassembler, open_rekey_untrusted

V = [{"group": "video", "role": "receiver", "level": ""}]


class Env:
    def __init__(self, home: Path, app: ControllerApp, server: ControllerServer, port: int) -> None:
        self.home, self.app, self.server, self.port = home, app, server, port

    def ctx(self, name: str, **kw) -> ssl.SSLContext:
        return client_context(self.home / "ca.crt", self.home / f"{name}.pem", **kw)

    async def reg(self, name: str, groups=V, keep: bool = False):
        return await register("127.0.0.1", self.port, self.ctx(name), groups, keep=keep)


@pytest.fixture
async def env(home: Path, nursery):
    add_member(home, "alice", [("video", "sender", ""), ("video", "receiver", "")])
    add_member(home, "bob", [("video", "receiver", "")])
    add_member(home, "carol", [("tv", "receiver", "sd")])
    add_member(home, "rita", [("video", "receiver", "")])
    add_member(home, "eve", [("video", "receiver", "")], expired=True)
    add_member(home, "fred", [("video", "receiver", "")], ca=pki.CA.create("other CA"))
    add_member(home, "good", [("video", "receiver", "")])
    add_member(home, "mallory", [])
    config = load_config(home / "groupsec.toml")
    store = SQLiteStore(home / "state.db")
    app = ControllerApp(config, store, pki.load_rekey_key(home), home)
    app.start()
    server = ControllerServer(app, server_ssl_context(home), home)
    [port] = await nursery.start(server.serve, "127.0.0.1", 0)
    return Env(home, app, server, port)


def _grants(reply) -> list[Grant]:
    assert isinstance(reply, Registered), reply
    return reply.grant_objects()


async def test_sender_and_receiver_get_their_material_only(env):
    ra, _ = await env.reg("alice", [{"group": "video", "role": "sender"}])
    [ga] = _grants(ra)
    assert [s.direction for s in ga.sas] == ["out"]
    assert ga.sender_id == 1
    assert ga.sas[0].params.sender_id == 1
    rb, _ = await env.reg("bob")
    [gb] = _grants(rb)
    assert [s.direction for s in gb.sas] == ["in"]
    assert gb.sender_id is None
    assert gb.sas[0].params.spi == ga.sas[0].params.spi
    assert rb.rekey_public_key == pki.load_rekey_key(env.home).public_key().public_bytes_raw()
    assert rb.member == "bob"  # the identity is the certificate's CN


async def test_level_sd_member_gets_no_hd_key(env):
    r, _ = await env.reg("carol", [{"group": "tv", "role": "receiver", "level": ""}])
    [g] = _grants(r)
    assert g.policy.level == "sd"
    hd = env.app.manager.state("tv", "hd")
    hd_keys = {d["enc_key"] for gen in hd["gens"] for d in [gen["group_sa"]]} | set(hd["keks"].values())
    assert not hd_keys & ({s.params.enc_key for s in g.sas} | {g.kek})
    r, _ = await env.reg("carol", [{"group": "tv", "role": "receiver", "level": "hd"}])
    assert isinstance(r, Error)
    assert r.code == "not-authorized"


async def test_unauthorized_revoked_unknown_group_refused(env):
    r, _ = await env.reg("mallory")
    assert (r.TYPE, r.code) == ("error", "not-authorized")
    await trio.to_thread.run_sync(admin_request, env.home, {"op": "revoke", "name": "rita"})
    r, _ = await env.reg("rita")
    assert (r.TYPE, r.code) == ("error", "revoked")
    r, _ = await env.reg("bob", [{"group": "nosuch", "role": "receiver"}])
    assert (r.TYPE, r.code) == ("error", "unknown-group")
    assert env.app.counters["error-not-authorized"] == 1
    assert env.app.counters["error-revoked"] == 1
    assert env.app.counters["error-unknown-group"] == 1
    r, _ = await env.reg("good")
    assert r.TYPE == "registered"


async def _refused_at_tls(env, ctx) -> None:
    # TLS 1.3: the client finishes first; the server's verdict arrives on the first read
    refused = False
    try:
        conn = await connect("127.0.0.1", env.port, ctx)
    except trio.BrokenResourceError:
        refused = True
    else:
        try:
            await conn.send(Register(1, V))
            refused = await conn.recv() is None
        except trio.BrokenResourceError:
            refused = True
        finally:
            await conn.aclose()
    assert refused
    r, _ = await env.reg("good")
    assert r.TYPE == "registered"


async def test_expired_certificate(env):
    await _refused_at_tls(env, env.ctx("eve"))
    assert env.app.counters["tls-certificate-has-expired"] == 1


async def test_unknown_ca(env):
    await _refused_at_tls(env, env.ctx("fred"))
    assert env.app.counters["tls-unable-to-get-local-issuer-certificate"] == 1
    assert env.app.counters.get("registrations") == 1


async def test_no_client_certificate(env):
    await _refused_at_tls(env, client_context(env.home / "ca.crt"))
    assert any(k.startswith("tls-") for k in env.app.counters)


async def test_tls12_refused(env):
    ctx = env.ctx("bob", minimum=ssl.TLSVersion.TLSv1_2, maximum=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(trio.BrokenResourceError):
        await connect("127.0.0.1", env.port, ctx)
    await trio.sleep(0.1)
    assert any("protocol" in k or "version" in k for k in env.app.counters), env.app.counters
    r, _ = await env.reg("good")
    assert r.TYPE == "registered"


async def test_malformed_and_oversized_frames_get_specific_errors(env):
    for payload, code in ((encode_frame(b"\x93\x01\x02"), "bad-message"),
                          (encode_frame(b"\xc1"), "bad-message"),
                          (((1 << 20) + 1).to_bytes(4, "big") + b"\0" * 1000, "frame-too-large")):
        conn = await connect("127.0.0.1", env.port, env.ctx("bob"))
        await conn.send_raw(payload)
        e = await conn.recv()
        assert isinstance(e, Error)
        assert e.code == code
        assert await conn.recv() is None  # closed
        await conn.aclose()
    conn = await connect("127.0.0.1", env.port, env.ctx("bob"))
    await conn.send(RekeyPush(b"x"))  # wrong type for the state
    e = await conn.recv()
    await conn.aclose()
    assert e.code == "unexpected-message"
    assert env.app.counters["error-bad-message"] == 2
    assert env.app.counters["error-frame-too-large"] == 1


async def test_handshake_never_finished_and_a_thousand_idle_connections(env):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    idle = []
    for _ in range(1000):
        idle.append(await trio.open_tcp_stream("127.0.0.1", env.port))
    await trio.sleep(0.2)
    assert env.server.active >= 1000
    with trio.fail_after(10):
        r, _ = await env.reg("good")  # served while a thousand connections sit idle
    assert r.TYPE == "registered"
    await trio.sleep(env.app.config.controller.handshake_timeout + 1.5)
    assert env.app.counters["handshake-timeout"] >= 1000
    assert env.server.active == 0
    for s in idle:
        assert await s.receive_some(10) == b""  # the server closed them
        await s.aclose()


async def test_admin_rekey_and_revoke_act_on_open_sessions(env):
    rb, bob = await env.reg("bob", keep=True)
    _, alice = await env.reg("alice", [{"group": "video", "role": "sender"}], keep=True)
    [gb] = _grants(rb)
    reply = await trio.to_thread.run_sync(admin_request, env.home, {"op": "rekey", "group": "video"})
    assert reply["ok"]
    assert reply["rekeyed"][0]["msg_id"] == 1
    push = await bob.recv()
    assert isinstance(push, RekeyPush)
    vk = [pki.load_rekey_key(env.home).public_key()]
    m = open_rekey_untrusted(push.datagram, vk, {gb.kek_epoch: gb.kek})
    assert m.msg_id == 1
    assert len(m.sas) == 2
    assert isinstance(await alice.recv(), RekeyPush)
    reply = await trio.to_thread.run_sync(admin_request, env.home, {"op": "revoke", "name": "alice"})
    assert reply == {"ok": True, "levels": 1}
    e = await alice.recv()
    assert (e.TYPE, e.code) == ("error", "revoked")
    assert await alice.recv() is None
    rr = await bob.recv()
    assert isinstance(rr, ResyncReply)
    g2 = Grant.from_wire_untrusted(rr.grant)
    assert g2.kek_epoch == gb.kek_epoch + 1
    reasm, m2 = Reassembler(), None
    while m2 is None:  # three generations of SAs no longer fit one 1200-byte datagram
        push = await bob.recv()
        m2 = reasm.add(open_rekey_untrusted(push.datagram, vk, {g2.kek_epoch: g2.kek}), 0.0)
    assert m2.msg_id == 2
    assert m2.revoked_senders == (1,)
    status = (await trio.to_thread.run_sync(admin_request, env.home, {"op": "status"}))["status"]
    by_name = {m["name"]: m for m in status["members"]}
    assert by_name["alice"]["revoked"]
    assert by_name["bob"]["connected"] == 1
    await bob.aclose()
    await alice.aclose()
