"""Issue 9 acceptance: source-origin authentication end to end, over real sockets (loopback
multicast, the ESP-in-UDP userspace path), with the real controller.

* forgery: a receiver that holds the group keys (a real member, registered over TLS with the
  controller) forges packets in the sender's name; the other receivers (real agent processes)
  reject them as ``source-auth-failed`` and still deliver every packet of the real sender;
* loss: 20% random loss between the sender and a receiver (a lossy UDP forwarder) under
  ``sign-batched``; every packet that arrives verifies and is delivered;
* revocation: after ``groupsec member revoke`` of the sender, the packets it still sends are
  rejected by the receivers as ``source-auth-failed`` (its key is gone, not just its SA);
* ``groupsec inspect`` with the group keys and the senders' public keys reports the forged
  packets of a capture as ``source-auth-failed`` and the real sender's as ``ok``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import time
from pathlib import Path

import pytest
import trio
from agent_helpers import (
    Agent,
    Controller,
    GroupDef,
    drain,
    free_port,
    relay_pair,
    run_cli,
    send_paced,
    sniffer,
    udp_socket,
    wait_for,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig, GroupSpec, load_bundle
from agent.datapath.base import GroupInstall
from agent.datapath.engine import GroupEngine
from agent.datapath.userspace import UserspaceConfig, UserspaceDatapath
from agent.session import AgentSession
from groupsec.inspect import SenderKeys, format_sender_keys
from groupsec.ipsec.ip import build_udp_packet
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.pcap import pcap_bytes
from groupsec.uat import write_esp_sa

REAL = b"REAL-"
FORGED = b"FORGED-"


class Recording:
    """A Datapath that only remembers the last install (the forger needs keys, not sockets)."""

    def __init__(self) -> None:
        self.install: GroupInstall | None = None

    def apply(self, install: GroupInstall) -> None:
        self.install = install

    def remove_group(self, key: tuple[str, str]) -> None:
        pass

    def statistics(self) -> dict[str, object]:
        return {}


def session_config(tmp: Path, bundle: Path, port: int, group: str, role: str) -> AgentConfig:
    state = tmp / f"session-{bundle.stem}"
    state.mkdir(exist_ok=True)
    return AgentConfig(bundle=bundle, groups=(GroupSpec(group, role),), controller=("127.0.0.1", port),
                       interface="lo", state_dir=state, ack_jitter=0.2, reconnect_min=0.2, reconnect_max=2.0)


def member_install(tmp: Path, bundle: Path, port: int, group: str) -> GroupInstall:
    """Register as a real (receiver) member over TLS and return what its data path would get."""
    dp = Recording()

    async def main() -> None:
        session = AgentSession(session_config(tmp, bundle, port, group, "receiver"), load_bundle(bundle), dp)
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                await n.start(session.run)
                while dp.install is None:
                    await session.member_changed()
                n.cancel_scope.cancel()

    trio.run(main)
    assert dp.install is not None
    return dp.install


def multicast_tx() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    return s


def forge(install: GroupInstall, victim_sender_id: int, key: bytes | None, n: int, group_port: int) -> list[bytes]:
    """A receiver's forgery: the group's shared SA with the victim's sender ID in the IV, sequence
    numbers far ahead of the victim's, signed with the forger's own key (or, ``key=None``, not at
    all: an ordinary group packet)."""
    (shared,) = [p for p in install.inbound if p.sender_id_bits]
    victim = dataclasses.replace(shared, sender_id=victim_sender_id)
    policy = install.policy if key is not None else dataclasses.replace(install.policy, source_auth="none")
    eng = GroupEngine(GroupInstall(policy, (), victim, signing_key=key), "encap", "127.0.0.1", time.monotonic())
    eng.outbound = SecurityAssociation(victim, "out", time.monotonic(), _test_next_seq=1_000_000 + 10_000 * (key is None))
    out: list[bytes] = []
    for i in range(n):
        out += eng.seal_payload(FORGED + b"%d" % i, 4242, group_port, time.monotonic())
    return out + eng.flush()


def counted(d: dict[str, int], n: int) -> dict[str, int] | None:
    """The drops once ``n`` forgeries were counted (as source-auth-failed, or as malformed when
    a packet carries no trailer of the group's type at all)."""
    return d if d.get("source-auth-failed", 0) + d.get("malformed", 0) >= n else None


def drops(agent: Agent, group: str = "video") -> dict[str, int]:
    return agent.datapath_group(group)["drops"]  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sign", "sign-batched"])
def test_a_receiver_with_the_group_keys_cannot_forge_the_sender(tmp_path, mode):
    g = GroupDef("video", extra={"source_auth": mode})
    ctl = Controller(tmp_path, [g])
    bundles = {"alice": ctl.add_member("alice", "video:sender"), "bob": ctl.add_member("bob", "video:receiver"),
               "carol": ctl.add_member("carol", "video:receiver"),
               "mallory": ctl.add_member("mallory", "video:receiver")}
    port = ctl.start()
    listen = free_port()
    deliver = {n: free_port() for n in ("bob", "carol")}
    agents = {"alice": Agent(tmp_path, "alice", bundles["alice"], f"127.0.0.1:{port}",
                             [{"name": "video", "role": "sender", "relay_listen": f"127.0.0.1:{listen}"}])}
    for n, p in deliver.items():
        agents[n] = Agent(tmp_path, n, bundles[n], f"127.0.0.1:{port}",
                          [{"name": "video", "role": "receiver", "relay_deliver": f"127.0.0.1:{p}"}])
    apps = {n: udp_socket(("127.0.0.1", p)) for n, p in deliver.items()}
    spy = sniffer(g.dst, g.encap)
    tx = multicast_tx()
    try:
        for a in agents.values():
            a.start()
        for a in agents.values():
            a.wait_registered("video")
        # the real sender first; the forger learns its sender ID from the wire (top 8 IV bits)
        first = [REAL + b"a%d" % i for i in range(20)]
        send_paced(listen, first)
        for n in deliver:
            assert sorted(drain(apps[n])) == sorted(first), n
        wire = drain(spy, quiet=0.3)
        assert len(wire) >= 20
        trailer = {"sign": 65, "sign-batched": 67}[mode]
        assert all(len(d) >= 8 + 8 + trailer for d in wire)
        victim_id = wire[0][8]
        # mallory is a registered receiver: it holds the group SA, but no signing key
        mine = member_install(tmp_path, bundles["mallory"], port, "video")
        assert mine.signing_key is None
        assert mine.sender_keys  # it knows the senders' public keys, which do not let it sign
        signed = forge(mine, victim_id, Ed25519PrivateKey.generate().private_bytes_raw(), 15, g.port)
        unsigned = forge(mine, victim_id, None, 5, g.port)
        for d in signed + unsigned:
            tx.sendto(d, (g.dst, g.encap))
            time.sleep(0.001)
        # ... rejected by both receivers, counted, delivered to nobody
        for n in deliver:
            d = wait_for(lambda n=n: counted(drops(agents[n]), 20), 10, f"{n} to count the forgeries")
            assert d.get("source-auth-failed", 0) >= 15  # every packet signed by the wrong key
            assert d.get("source-auth-failed", 0) + d.get("malformed", 0) == 20
            assert d.get("replay", 0) == 0
            assert drain(apps[n], quiet=0.3) == []
        # `groupsec inspect` with the group keys and the senders' public keys explains a capture
        cap, keys, senders = tmp_path / "forgery.pcap", tmp_path / "esp_sa", tmp_path / "senders.json"
        cap.write_bytes(pcap_bytes([(1.0 + i, build_udp_packet("127.0.0.1", g.dst, 40000, g.encap, d))
                                    for i, d in enumerate(wire[:5] + signed[:3] + unsigned[:2])]))
        write_esp_sa(str(keys), mine.inbound)
        senders.write_text(format_sender_keys([SenderKeys(g.dst, mode, mine.sender_keys, mine.owners)]))
        out = run_cli("inspect", str(cap), "--keys", str(keys), "--sender-keys", str(senders),
                      "--udp-port", str(g.encap), "--json").stdout
        verdicts = [p["verdict"] for p in json.loads(out)["packets"]]
        assert verdicts[:8] == ["ok"] * 5 + ["source-auth-failed"] * 3
        assert set(verdicts[8:]) <= {"malformed", "source-auth-failed"}  # no trailer of the group's type
        assert len(verdicts) == 10
        # the forgeries (sequence numbers far ahead) did not silence the real sender
        second = [REAL + b"b%d" % i for i in range(30)]
        send_paced(listen, second)
        for n in deliver:
            assert sorted(drain(apps[n])) == sorted(second), n
            st = agents[n].datapath_group("video")
            assert st["source_auth"]["mode"] == mode
            assert st["source_auth"]["verified"] >= 50
    finally:
        for a in agents.values():
            a.stop()
        ctl.stop()
        for s in (*apps.values(), spy, tx):
            s.close()


class PortShift:
    """The receiver's data path listens on another encapsulation port than the group's (where
    the lossy forwarder sends); everything else it is given is the real install."""

    def __init__(self, inner: UserspaceDatapath, port: int) -> None:
        self.inner, self.port = inner, port

    def apply(self, install: GroupInstall) -> None:
        self.inner.apply(dataclasses.replace(install, policy=dataclasses.replace(install.policy,
                                                                                 udp_encap_port=self.port)))

    def remove_group(self, key: tuple[str, str]) -> None:
        self.inner.remove_group(key)

    def statistics(self) -> dict[str, object]:
        return self.inner.statistics()


@pytest.fixture
def lossy_world(tmp_path):
    g = GroupDef("video", extra={"source_auth": "sign-batched"})
    ctl = Controller(tmp_path, [g])
    bundles = {"alice": ctl.add_member("alice", "video:sender"), "bob": ctl.add_member("bob", "video:receiver")}
    port = ctl.start()
    try:
        yield tmp_path, g, bundles, port
    finally:
        ctl.stop()


@pytest.mark.slow
async def test_twenty_percent_random_loss_does_not_stop_the_rest_from_verifying(lossy_world):
    tmp, g, bundles, port = lossy_world
    shifted = free_port()
    rng = random.Random(0x5EED)
    fwd = {"in": 0, "forwarded": 0, "dropped": 0}
    N = 600
    tx_dp = UserspaceDatapath(UserspaceConfig(interface="lo"))
    rx_dp = UserspaceDatapath(UserspaceConfig(interface="lo"))
    key = ("video", "")

    async def forwarder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        rx = sniffer(g.dst, g.encap)
        out = multicast_tx()
        rx.setblocking(False)
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(rx)
                while True:
                    try:
                        data = rx.recv(65535)
                    except BlockingIOError:
                        break
                    fwd["in"] += 1
                    if rng.random() < 0.2:
                        fwd["dropped"] += 1
                        continue
                    out.sendto(data, (g.dst, shifted))
                    fwd["forwarded"] += 1
        finally:
            rx.close()
            out.close()

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await n.start(tx_dp.run)
            await n.start(rx_dp.run)
            await n.start(forwarder)
            sender = AgentSession(session_config(tmp, bundles["alice"], port, "video", "sender"),
                                  load_bundle(bundles["alice"]), tx_dp)
            receiver = AgentSession(session_config(tmp, bundles["bob"], port, "video", "receiver"),
                                    load_bundle(bundles["bob"]), PortShift(rx_dp, shifted))
            await n.start(sender.run)
            await n.start(receiver.run)
            while key not in receiver.installed or key not in sender.installed:
                waiting = receiver if key not in receiver.installed else sender
                await waiting.member_changed()
            got: set[bytes] = set()
            async with rx_dp.open_socket(key) as rs, tx_dp.open_socket(key, sport=4000) as ss:
                async def collect() -> None:
                    async for dg in rs:
                        got.add(dg.payload)
                n.start_soon(collect)
                for i in range(N):
                    await ss.send(b"LOSSY-%05d" % i)
                    if i % 10 == 9:
                        await trio.sleep(0.003)  # windows close by count and by the 20 ms timer
                await trio.sleep(1.0)
                stats = rx_dp.statistics()["groups"]["video"]
            n.cancel_scope.cancel()
    assert fwd["in"] == N  # every packet the sender made reached the wire (the timer flushed the last window)
    assert 0.12 * N < fwd["dropped"] < 0.28 * N
    assert len(got) == fwd["forwarded"]  # every packet that arrived verified and was delivered
    assert got <= {b"LOSSY-%05d" % i for i in range(N)}
    assert stats["drops"] == {}
    sa = stats["source_auth"]
    assert sa["verified"] == fwd["forwarded"]
    # one signature per window, not per packet: far fewer checks than packets
    assert 0 < sa["signature_checks"] < fwd["forwarded"] / 4


@pytest.mark.slow
def test_a_revoked_senders_new_packets_are_rejected(tmp_path):
    # a long dtd: the receivers still hold the old SA when the revoked sender keeps sending, so
    # what rejects its packets is the removed key, not a missing SA
    g = GroupDef("video", extra={"source_auth": "sign", "atd": 0.5, "dtd": 20.0, "tek_lifetime": 3600})
    ctl = Controller(tmp_path, [g], heartbeat=1.0)
    bundles = {"alice": ctl.add_member("alice", "video:sender"), "bob": ctl.add_member("bob", "video:receiver")}
    port = ctl.start()
    agents, listen, deliver = relay_pair(tmp_path, ctl, port, bundles)
    app = udp_socket(("127.0.0.1", deliver))
    try:
        for a in agents.values():
            a.start()
        for a in agents.values():
            a.wait_registered("video")
        before = [REAL + b"%d" % i for i in range(20)]
        send_paced(listen, before)
        assert sorted(drain(app)) == sorted(before)
        old_spis = {sa["spi"] for sa in agents["bob"].group("video")["sas"]}
        ctl.cli("member", "revoke", "alice")
        wait_for(lambda: {sa["spi"] for sa in agents["bob"].group("video")["sas"]} - old_spis, 15,
                 "bob to install the post-revocation SA")
        assert old_spis <= {sa["spi"] for sa in agents["bob"].group("video")["sas"]}  # old SA still there
        # alice's agent was cut off but still holds its old SA and signing key: it keeps sending
        after = [b"AFTER-%d" % i for i in range(25)]
        send_paced(listen, after)
        d = wait_for(lambda: drops(agents["bob"]).get("source-auth-failed", 0) >= 25 and drops(agents["bob"]),
                     10, "bob to reject the revoked sender's packets")
        assert d["source-auth-failed"] == 25
        assert d.get("unknown-spi", 0) == 0
        assert drain(app, quiet=0.5) == []
    finally:
        for a in agents.values():
            a.stop()
        ctl.stop()
        app.close()

