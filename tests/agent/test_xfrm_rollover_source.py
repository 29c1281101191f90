"""A sender's next tunnel-mode SA carries the sender's outer source address in the kernel.

The rollover adds the next SA before its activation, while the current SA is still the
outbound one. The kernel cannot change an SA's source address later, and a tunnel-mode SA
without one sends ESP from 0.0.0.0, which every receiver drops as a martian before XFRM sees
it (seen in the VM: every packet after the first rollover lost at both receivers, with no
XFRM error counted anywhere). Checked here on the netlink requests, with a recording fake.
"""

from __future__ import annotations

from agent.datapath.base import GroupInstall
from agent.datapath.netlink import SAInfo, XfrmNotFound
from agent.datapath.sockets import Interface
from agent.datapath.xfrm import XfrmDatapath
from groupsec.ipsec.policy import GroupPolicy
from groupsec.keys.tek import new_sa

SOURCE = "10.98.0.1"


class RecordingNetlink:
    """What the kernel would hold: SAs by (daddr, SPI, proto); policies are accepted and dropped."""

    def __init__(self) -> None:
        self.sas: dict[tuple[str, int, int], SAInfo] = {}
        self.added: list[SAInfo] = []

    def add_sa(self, sa: SAInfo, *, update: bool = False) -> None:
        self.sas[(sa.daddr, sa.spi, sa.proto)] = sa
        self.added.append(sa)

    def delete_sa(self, daddr: str, spi: int, proto: int) -> None:
        if self.sas.pop((daddr, spi, proto), None) is None:
            raise XfrmNotFound("no such SA", 3, "DELSA")

    def add_policy(self, pol: object, *, update: bool = False) -> None:
        pass

    def dump_policies(self) -> list[object]:
        return []

    def dump_sas(self) -> list[SAInfo]:
        return list(self.sas.values())

    def close(self) -> None:
        pass


def _datapath() -> tuple[XfrmDatapath, RecordingNetlink]:
    nl = RecordingNetlink()
    iface = Interface("eth0", 2, SOURCE, 2)  # AF_INET
    return XfrmDatapath(netlink=nl, interface=iface), nl  # type: ignore[arg-type]


def _policy(mode: str = "tunnel") -> GroupPolicy:
    return GroupPolicy("video", "239.9.9.9", port=5004, udp_encap_port=None, mode=mode,  # type: ignore[arg-type]
                       sender_policy="per-sender")


def _sas(policy: GroupPolicy) -> tuple:
    return new_sa(policy, 0x1001, 0, 3600), new_sa(policy, 0x1002, 0, 3600), new_sa(policy, 0x1003, 0, 3600)


def test_every_sa_a_tunnel_sender_rolls_over_to_has_its_source(monkeypatch) -> None:
    dp, nl = _datapath()
    monkeypatch.setattr(dp, "_sockets", lambda g, install: None)  # no join sockets in a unit test
    policy = _policy()
    a, b, c = _sas(policy)
    other = new_sa(policy, 0x2001, 0, 3600)  # another sender's SA: we only receive under it
    owners = {a.spi: 1, b.spi: 1, c.spi: 1, other.spi: 2}  # per-sender SAs: SPI -> sender ID (the grant's map)
    dp.apply(GroupInstall(policy, (other,), a, owners=owners))  # registered: sending with A
    for cur, nxt in ((a, b), (b, c)):
        # the rekey: our next SA listed as inbound, still sending with the current one
        dp.apply(GroupInstall(policy, (nxt, other), cur, owners=owners))
        dp.apply(GroupInstall(policy, (nxt, other), nxt, owners=owners))  # activation: the outbound switch
        dp.apply(GroupInstall(policy, (other,), nxt, owners=owners))  # deactivation of the old one
        held = nl.sas[(policy.dst, nxt.spi, 50)]
        assert held.saddr == SOURCE, f"SA {nxt.spi:#x} would send from {held.saddr or '0.0.0.0'}"
    assert set(nl.sas) == {(policy.dst, c.spi, 50), (policy.dst, other.spi, 50)}
    assert sorted(sa.spi for sa in nl.added) == [a.spi, b.spi, c.spi, other.spi]  # each once: no re-add
    assert nl.sas[(policy.dst, other.spi, 50)].saddr in ("", "0.0.0.0")  # not ours: no source of ours


def test_a_shared_levels_next_sa_is_reinstalled_with_our_source_before_the_switch(monkeypatch) -> None:
    dp, nl = _datapath()
    monkeypatch.setattr(dp, "_sockets", lambda g, install: None)
    policy = _policy()
    a, b, _ = _sas(policy)
    dp.apply(GroupInstall(policy, (a, b), a))  # no owners map (shared level): B is just another inbound SA
    assert nl.sas[(policy.dst, b.spi, 50)].saddr in ("", "0.0.0.0")
    dp.apply(GroupInstall(policy, (a, b), b))  # now sending with B
    assert nl.sas[(policy.dst, b.spi, 50)].saddr == SOURCE
    assert sorted(sa.spi for sa in nl.added) == [a.spi, b.spi, b.spi]  # B added again, A left alone


def test_transport_mode_and_receivers_get_no_source(monkeypatch) -> None:
    dp, nl = _datapath()
    monkeypatch.setattr(dp, "_sockets", lambda g, install: None)
    policy = _policy("transport")
    a, b, _ = _sas(policy)
    dp.apply(GroupInstall(policy, (b,), a))
    dp.apply(GroupInstall(policy, (b,), b))
    assert sorted(sa.spi for sa in nl.added) == [a.spi, b.spi]  # no re-add at the switch
    assert all(sa.saddr in ("", "0.0.0.0") for sa in nl.sas.values())
