"""A shared group SA on a non-counter-mode suite (CBC+HMAC: no sender ID in the IV) must be
usable by every sender of a "shared" level, also when it arrives in a rekey. Regression: the
sender kept sealing under the old SA after activation, and receivers dropped that SA at DTD."""

from __future__ import annotations

import os

from member_helpers import FakeController

from groupsec.ipsec.params import SAParams
from groupsec.protocol.member import InstallChanged, MemberProtocol
from groupsec.protocol.messages import GroupRequest

T0 = 50.0
CBC = "aes-cbc-128-hmac-sha-256"


class CbcController(FakeController):
    def sa(self, group: str, level: str = "") -> SAParams:
        self.next_spi += 1
        return SAParams(spi=self.next_spi, protocol="esp", suite=CBC, mode="tunnel", dst="239.1.1.1",
                        enc_key=os.urandom(16), auth_key=os.urandom(32), group=group, level=level)


def _drain(m: MemberProtocol) -> list:
    out = []
    while (e := m.next_event()) is not None:
        out.append(e)
    return out


def _member(role: str, sender_policy: str) -> tuple[CbcController, MemberProtocol]:
    ctl = CbcController()
    ctl.add_group("video", suite=CBC, sender_policy=sender_policy)
    m = MemberProtocol([GroupRequest("video", role)], jitter=lambda high: high)
    m.connect(T0)
    m.messages_to_send()
    m.receive_message(ctl.registered(ctl.grant("video", role, sender_id=3)), T0)
    _drain(m)
    return ctl, m


def test_sender_switches_to_a_rekeyed_shared_cbc_sa_at_activation() -> None:
    ctl, m = _member("sender", "shared")
    old_spi = ctl.levels[("video", "")].sas[0].params.spi
    assert m.install_for(("video", ""), T0).outbound.spi == old_spi
    (dg,) = ctl.rekey("video")
    new_spi = ctl.levels[("video", "")].sas[-1].params.spi
    m.receive_datagram(dg, T0 + 0.1)
    evs = [e for e in _drain(m) if isinstance(e, InstallChanged)]
    assert evs
    assert evs[-1].install.outbound.spi == old_spi
    act = T0 + ctl.levels[("video", "")].policy.atd
    while (t := m.get_timer()) is not None and t <= act + 1e-6:
        m.handle_timer(t)
    out = m.install_for(("video", ""), act + 1e-3).outbound
    assert out is not None
    assert out.spi == new_spi
    assert out.sender_id is None  # CBC carries no sender ID


def test_receiver_of_a_shared_cbc_level_still_gets_no_outbound_sa() -> None:
    ctl, m = _member("receiver", "shared")
    (dg,) = ctl.rekey("video")
    m.receive_datagram(dg, T0 + 0.1)
    act = T0 + ctl.levels[("video", "")].policy.atd
    assert m.install_for(("video", ""), act + 1).outbound is None


def test_per_sender_level_does_not_hand_a_sender_someone_elses_sa() -> None:
    ctl, m = _member("sender", "per-sender")
    (dg,) = ctl.rekey("video")  # a new SA that the owners map does not give us
    m.receive_datagram(dg, T0 + 0.1)
    act = T0 + ctl.levels[("video", "")].policy.atd
    new_spi = ctl.levels[("video", "")].sas[-1].params.spi
    out = m.install_for(("video", ""), act + 1).outbound
    assert out is None or out.spi != new_spi
