"""The userspace data path between network namespaces on one bridge, with static SAs:
a sender, two receivers and an eavesdropper (wrong keys). Traffic from the sender's
applications (through the local relay and through TUN mode) reaches both receivers'
applications (through both); the bridge carries no plaintext; the eavesdropper decrypts
nothing; a receive-only member refuses to send."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
from netns import (
    Lan,
    listener_result,
    send,
    skip_unless_netns,
    start_agent,
    start_listener,
    stop_agent,
)

from agent.datapath.bench import install_to_json, static_installs

pytestmark = pytest.mark.netns

RELAY_IN, RELAY_OUT, PORT, ENCAP = 16100, 16101, 5004, 4500


@pytest.fixture
def lan() -> Iterator[Lan]:
    skip_unless_netns()
    with Lan() as lan:
        yield lan


def agent_spec(install: dict[str, object], *, relay_in: bool = True, tun: bool = True) -> dict[str, object]:
    return {"config": {"interface": "eth0",
                       "relays": {"g": {"listen": ["127.0.0.1", RELAY_IN] if relay_in else None,
                                        "deliver": ["127.0.0.1", RELAY_OUT]}},
                       "tun": {"name": "gsec0"} if tun else None},
            "installs": [install]}


def group_drops(stats: dict[str, object]) -> dict[str, int]:
    return stats["groups"]["g"]["drops"]  # type: ignore[index,no-any-return]


@pytest.mark.parametrize(("wire", "protocol", "mode", "suite"), [
    ("encap", "esp", "tunnel", "aes-gcm-16-128"),
    ("raw", "esp", "tunnel", "aes-gcm-16-128"),
    ("raw", "esp", "transport", "chacha20-poly1305"),
    ("raw", "ah", "transport", "hmac-sha-256-128"),
])
def test_sender_two_receivers_and_an_eavesdropper(lan: Lan, wire: str, protocol: str, mode: str,
                                                  suite: str) -> None:
    b = os.urandom(2)
    group = f"239.{200 + b[0] % 50}.{b[1]}.7"
    tx, rx = static_installs(group, group="g", port=PORT, encap_port=ENCAP if wire == "encap" else None,
                             suite=suite, mode=mode, protocol=protocol)
    out = tx.outbound
    assert out is not None
    # the eavesdropper knows the group, the port and even the SPI, but not the keys
    _, eve_inst = static_installs(group, group="g", port=PORT, encap_port=ENCAP if wire == "encap" else None,
                                  suite=suite, mode=mode, protocol=protocol, spi=out.spi)
    sender, r1, r2, eve = lan.add("snd"), lan.add("rx1"), lan.add("rx2"), lan.add("eve")
    cap = lan.capture()

    agents = {sender.name: start_agent(sender, agent_spec(install_to_json(tx)))}
    for ns in (r1, r2):
        agents[ns.name] = start_agent(ns, agent_spec(install_to_json(rx)))
    agents[eve.name] = start_agent(eve, agent_spec(install_to_json(eve_inst), tun=False))

    relay_msgs = [f"RELAY-SECRET-{i}-{os.urandom(4).hex()}" for i in range(5)]
    tun_msgs = [f"TUN-SECRET-{i}-{os.urandom(4).hex()}" for i in range(5)]
    expect = len(relay_msgs) + len(tun_msgs)
    listeners: dict[str, object] = {}
    for ns in (r1, r2):
        listeners[ns.name + "/relay"] = start_listener(ns, "127.0.0.1", RELAY_OUT, expect=expect, seconds=8)
        listeners[ns.name + "/tun"] = start_listener(ns, "0.0.0.0", PORT, group=group, expect=expect, seconds=8)
    eve_relay = start_listener(eve, "127.0.0.1", RELAY_OUT, seconds=4)
    eve_plain = start_listener(eve, "0.0.0.0", PORT, group=f"{group}@{eve.address}", seconds=4)  # plaintext on the LAN, if any

    send(sender, "127.0.0.1", RELAY_IN, relay_msgs)  # app -> local relay
    send(sender, group, PORT, tun_msgs)  # unmodified app -> plain multicast -> routed into the TUN

    for name, p in listeners.items():
        got = listener_result(p)  # type: ignore[arg-type]
        assert sorted(m for m, _ in got) == sorted(relay_msgs + tun_msgs), name
        if name.endswith("/tun"):
            # address preservation: the receiving app sees the sender's address as the source
            assert {a for _, a in got} == {sender.address}, name

    # a receive-only member refuses to send, through the relay and through the TUN
    send(r1, "127.0.0.1", RELAY_IN, ["FORBIDDEN-RELAY"])
    send(r1, group, PORT, ["FORBIDDEN-TUN"])
    rx2_probe = start_listener(r2, "127.0.0.1", RELAY_OUT, seconds=1.5)
    assert listener_result(rx2_probe) == []

    assert listener_result(eve_relay) == []
    assert listener_result(eve_plain) == []
    final = {name: stop_agent(p) for name, p in agents.items()}
    pcap = cap.stop()

    # nothing on the bridge in plaintext (AH authenticates but does not encrypt: there the
    # payload is visible by design), plenty of protected traffic, and nothing from receivers
    if protocol == "esp":
        assert b"SECRET" not in pcap
    else:
        assert pcap.count(b"SECRET") >= expect
    assert b"FORBIDDEN" not in pcap
    spi = out.spi.to_bytes(4, "big")
    assert len(re.findall(re.escape(spi), pcap)) >= expect
    # ...and none of it from the receive-only members
    for ns in (r1, r2):
        st = final[ns.name]["groups"]["g"]
        assert st["tx_packets"] == 0
        assert st["rx_packets"] == expect
    assert final[r1.name]["groups"]["g"]["relay"]["drops"] == {"receive-only": 1}
    assert final[r1.name]["tun"]["drops"].get("receive-only") == 1
    # the eavesdropper decrypted nothing: every packet failed authentication
    eve_g = final[eve.name]["groups"]["g"]
    assert eve_g["rx_packets"] == 0
    assert eve_g["relay"]["delivered"] == 0
    assert eve_g["drops"].get("auth-failed", 0) >= expect
    assert final[sender.name]["groups"]["g"]["tx_packets"] == expect


def test_plaintext_for_the_group_is_counted(lan: Lan) -> None:
    """Fail closed: unprotected UDP to the group's port on the wire is counted, never relayed."""
    b = os.urandom(2)
    group = f"239.{200 + b[0] % 50}.{b[1]}.9"
    _, rx = static_installs(group, group="g", port=PORT, encap_port=ENCAP)
    _, rx_raw = static_installs(group, group="g", port=PORT, encap_port=None)
    attacker, enc, raw = lan.add("atk"), lan.add("enc"), lan.add("raw")
    a_enc = start_agent(enc, agent_spec(install_to_json(rx), relay_in=False, tun=False))
    a_raw = start_agent(raw, agent_spec(install_to_json(rx_raw), relay_in=False, tun=False))
    l_enc = start_listener(enc, "127.0.0.1", RELAY_OUT, seconds=1.5)
    l_raw = start_listener(raw, "127.0.0.1", RELAY_OUT, seconds=1.5)
    attacker.ip("route", "add", "224.0.0.0/4", "dev", "eth0")
    send(attacker, group, PORT, ["PLAIN-1", "PLAIN-2", "PLAIN-3"])
    assert listener_result(l_enc) == []
    assert listener_result(l_raw) == []
    assert group_drops(stop_agent(a_enc)).get("plaintext") == 3
    assert group_drops(stop_agent(a_raw)).get("plaintext") == 3
