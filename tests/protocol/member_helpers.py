"""A tiny in-memory controller for the member state machine tests (no sockets, fake clock)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from groupsec.ipsec.params import SAParams
from groupsec.ipsec.policy import GroupPolicy
from groupsec.protocol.messages import Grant, Registered, SAGrant
from groupsec.protocol.rekey import build_rekey_datagrams

SUITE = "aes-gcm-16-128"


def new_sa(spi: int, dst: str = "239.1.1.1", shared: bool = True, group: str = "video", level: str = "") -> SAParams:
    return SAParams(spi=spi, protocol="esp", suite=SUITE, mode="tunnel", dst=dst, enc_key=os.urandom(20),
                    sender_id_bits=8 if shared else 0, group=group, level=level)


@dataclass
class FakeLevel:
    policy: GroupPolicy
    kek_epoch: int = 1
    kek: bytes = field(default_factory=lambda: os.urandom(32))
    msg_id: int = 1
    sas: list[SAGrant] = field(default_factory=list)


class FakeController:
    """Holds keys like the real controller would and builds the messages a member sees."""

    def __init__(self, now: float = 1000.0) -> None:
        self.signing_key = Ed25519PrivateKey.generate()
        self.now = now  # controller wall clock
        self.levels: dict[tuple[str, str], FakeLevel] = {}
        self.next_spi = 0x1000

    @property
    def public_key(self) -> bytes:
        return self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def add_group(self, group: str, dst: str = "239.1.1.1", level: str = "", **kw: object) -> FakeLevel:
        policy = GroupPolicy(group=group, dst=dst, level=level, rekey_addr="239.9.9.9", rekey_port=5999, **kw)
        lv = FakeLevel(policy)
        lv.sas.append(SAGrant(self.sa(group, level), "in", activate_at=self.now - 10))
        self.levels[policy.key] = lv
        return lv

    def sa(self, group: str, level: str = "") -> SAParams:
        self.next_spi += 1
        return new_sa(self.next_spi, self.levels[(group, level)].policy.dst if (group, level) in self.levels
                      else "239.1.1.1", group=group, level=level)

    def grant(self, group: str, role: str = "receiver", level: str = "", sender_id: int | None = None) -> Grant:
        lv = self.levels[(group, level)]
        return Grant(lv.policy, role, tuple(lv.sas), lv.kek_epoch, lv.kek, lv.msg_id,
                     sender_id if role == "sender" else None)

    def registered(self, *grants: Grant, member: str = "m1", heartbeat: float = 10.0) -> Registered:
        return Registered(member, [g.to_wire() for g in grants], self.public_key, self.now, heartbeat)

    def rekey(self, group: str, level: str = "", *, new_sas: int = 1, remove: tuple[int, ...] = (),
              new_kek: bool = False, msg_id: int | None = None, mtu: int = 1200, signing_key=None,
              kek: tuple[int, bytes] | None = None, atd: float | None = None) -> list[bytes]:
        """A TEK (and optionally KEK) rollover: new SAs activate after ATD; the old ones get a DTD."""
        lv = self.levels[(group, level)]
        atd = lv.policy.atd if atd is None else atd
        act = self.now + atd
        fresh = [SAGrant(self.sa(group, level), "in", activate_at=act) for _ in range(new_sas)]
        old = [SAGrant(s.params, s.direction, s.activate_at, act + lv.policy.dtd) for s in lv.sas
               if s.params.spi not in remove and s.deactivate_at is None]
        inner: dict[str, object] = {"sas": [s.to_wire() for s in old + fresh], "remove": list(remove)}
        epoch, key = kek or (lv.kek_epoch, lv.kek)
        if new_kek:
            lv.kek_epoch += 1
            lv.kek = os.urandom(32)
            inner["kek"] = {"epoch": lv.kek_epoch, "key": lv.kek}
        lv.msg_id = lv.msg_id + 1 if msg_id is None else msg_id
        lv.sas = old + fresh
        return build_rekey_datagrams(signing_key or self.signing_key, epoch, key, group, level, lv.msg_id,
                                     "rekey", inner, self.now, mtu=mtu)

    def heartbeat(self, group: str, level: str = "", msg_id: int | None = None) -> bytes:
        lv = self.levels[(group, level)]
        return build_rekey_datagrams(self.signing_key, lv.kek_epoch, lv.kek, group, level,
                                     lv.msg_id if msg_id is None else msg_id, "heartbeat", {}, self.now)[0]
