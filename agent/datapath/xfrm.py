"""The kernel data path: a group's SAs and policies installed into Linux XFRM.

Unmodified applications send and receive plain UDP multicast; the kernel applies ESP or
AH to it. The agent only manages keys: ``apply`` makes the kernel's state for one group
(level) exactly what a :class:`~agent.datapath.base.GroupInstall` describes.

What it installs for each group (level):

* one kernel SA per (group address, SPI, protocol) listed as inbound or outbound;
* a ``dir in`` policy on the group's selector with a template (protocol, mode, the
  group's reqid): unprotected traffic for the group is dropped (fail closed), and a
  tunnel-mode SA's decapsulated packets are accepted;
* a ``dir out`` policy on the same selector: with an outbound SA, a template that names
  that SA's SPI (so the switch at activation is one policy update); without one, the
  action is ``block``, so plaintext never leaves for a protected group.

Ownership: every SA carries a reqid in ``[reqid_base, reqid_base + reqid_span)`` and every
policy carries our ``priority``. ``reconcile()`` (at start) removes stale state of ours,
``close()`` removes all of ours; state of anybody else is never touched.

Linux builds the ESP IV from the sequence number (seqiv), so a counter-mode SA shared by
several senders (RFC 6054 sender IDs) cannot be installed: ``apply`` refuses it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
from dataclasses import dataclass, field
from typing import Any

from agent.datapath.base import GroupInstall
from agent.datapath.netlink import (
    PROTO_NUMBERS,
    XFRM_MODE_TRANSPORT,
    XFRM_MODE_TUNNEL,
    XFRM_POLICY_ALLOW,
    XFRM_POLICY_BLOCK,
    XFRM_POLICY_IN,
    XFRM_POLICY_OUT,
    XFRM_STATE_ALIGN4,
    Algo,
    Encap,
    LifetimeCfg,
    PolicyInfo,
    SAInfo,
    Selector,
    Template,
    XfrmError,
    XfrmExists,
    XfrmNetlink,
    XfrmNotFound,
)
from agent.datapath.sockets import Interface, family_of, join_group
from groupsec.errors import PolicyError
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.policy import GroupPolicy
from groupsec.ipsec.sourceauth import source_auth_refusal

log = logging.getLogger(__name__)

REQID_BASE = 0x47530000  # "GS": the reqids of our SAs and templates
REQID_SPAN = 0x10000
DEFAULT_PRIORITY = 0x4753  # the priority that marks a policy as ours
SOL_UDP = 17
UDP_ENCAP = 100
UDP_ENCAP_ESPINUDP = 2
_MODES = {"transport": XFRM_MODE_TRANSPORT, "tunnel": XFRM_MODE_TUNNEL}

SaKey = tuple[str, int, int]  # (group address, SPI, protocol number): how the kernel names an SA


def kernel_sa_for(params: SAParams, reqid: int, source: str | None = None) -> SAInfo:
    """The kernel SA for ``params``. Refuses what XFRM cannot do safely (``PolicyError``)."""
    suite = params.suite_obj
    if params.sender_id_bits:
        raise PolicyError(
            f"SA {params.spi:#010x} ({params.suite}) is shared by several senders (sender_id_bits="
            f"{params.sender_id_bits}): the Linux kernel builds the IV from the sequence number and cannot "
            "carry a sender ID, so an XFRM member needs per-sender SAs, each with its own key"
        )
    algos: list[Algo] = []
    if suite.kind in ("aead", "gmac"):
        if suite.xfrm_enc is None:
            raise PolicyError(f"{suite.name} has no Linux XFRM algorithm")
        algos.append(Algo("aead", suite.xfrm_enc, params.enc_key, suite.icv_len * 8))  # GMAC too: rfc4543
    else:
        if suite.protocol == "esp" and suite.xfrm_enc:
            algos.append(Algo("crypt", suite.xfrm_enc, params.enc_key))
        if suite.xfrm_auth is None:
            raise PolicyError(f"{suite.name} has no Linux XFRM integrity algorithm")
        algos.append(Algo("auth", suite.xfrm_auth, params.auth_key, suite.icv_len * 8))
    family = family_of(params.dst)
    host = 32 if family == socket.AF_INET else 128
    src = params.src or source
    mode = _MODES[params.mode]
    # the SA's own selector: in transport mode it pins the SA to the group's address
    sel = Selector(family, params.dst, "::" if family == socket.AF_INET6 else "0.0.0.0",
                   host if mode == XFRM_MODE_TRANSPORT else 0)
    flags = XFRM_STATE_ALIGN4 if params.protocol == "ah" and params.ah_align4 and family == socket.AF_INET else 0
    lt = params.lifetime
    lifetime = LifetimeCfg(lt.soft_bytes, lt.hard_bytes, lt.soft_packets, lt.hard_packets,
                           math.ceil(lt.soft_seconds), math.ceil(lt.hard_seconds))
    encap = Encap(params.udp_encap_port, params.udp_encap_port) if params.udp_encap_port else None
    return SAInfo(family, params.dst, params.spi, PROTO_NUMBERS[params.protocol], src or "", mode, reqid, sel,
                  params.replay_window, flags, lifetime, tuple(algos), encap)


def group_selector(policy: GroupPolicy) -> Selector:
    family = family_of(policy.dst)
    host = 32 if family == socket.AF_INET else 128
    any_addr = "0.0.0.0" if family == socket.AF_INET else "::"
    return Selector(family, policy.dst, policy.src or any_addr, host, host if policy.src else 0,
                    policy.ip_proto or 0, policy.port or 0)


@dataclass
class _Group:
    policy: GroupPolicy
    reqid: int
    sas: dict[SaKey, SAParams] = field(default_factory=dict)
    saddr: dict[SaKey, str] = field(default_factory=dict)  # each SA's source address in the kernel ("" = any)
    out_spi: int | None = None
    out_key: SaKey | None = None
    policies: bool = False
    join: socket.socket | None = None
    encap: list[socket.socket] = field(default_factory=list)


class XfrmDatapath:
    """The Datapath protocol (``agent.datapath.base``) on Linux XFRM.

    ``interface``: where to join the groups this member receives (IGMP/MLD) and whose
    address is the outer source of a tunnel-mode SA that names none; None leaves joins to
    the applications and picks the source from the routing table.

    Use it from the network namespace it was created in: its netlink socket is bound there
    at construction, but the ESP-in-UDP and join sockets are opened at ``apply`` time.
    """

    def __init__(self, *, reqid_base: int = REQID_BASE, reqid_span: int = REQID_SPAN,
                 priority: int = DEFAULT_PRIORITY, interface: Interface | None = None,
                 netlink: XfrmNetlink | None = None) -> None:
        if not 0 < reqid_base < reqid_base + reqid_span <= 0xFFFFFFFF:
            raise PolicyError("the reqid range must lie inside 1..2^32-1")
        self.reqid_base, self.reqid_span, self.priority = reqid_base, reqid_span, priority
        self.interface = interface
        self.nl = netlink if netlink is not None else XfrmNetlink()
        self._groups: dict[tuple[str, str], _Group] = {}
        self._next_reqid = reqid_base + 1
        self._closed = False

    # -- ownership --
    def owns_reqid(self, reqid: int) -> bool:
        return self.reqid_base <= reqid < self.reqid_base + self.reqid_span

    def owns_policy(self, pol: PolicyInfo) -> bool:
        return pol.priority == self.priority and all(self.owns_reqid(t.reqid) for t in pol.templates)

    def reconcile(self) -> int:
        """Remove every SA and policy of ours that this instance does not hold (stale state
        of an earlier run). Returns how many kernel objects were removed."""
        mine_sas = {k for g in self._groups.values() for k in g.sas}
        mine_sels = {(group_selector(g.policy), d) for g in self._groups.values() if g.policies
                     for d in (XFRM_POLICY_IN, XFRM_POLICY_OUT)}
        removed = 0
        for pol in self.nl.dump_policies():
            if self.owns_policy(pol) and (pol.selector, pol.dir) not in mine_sels:
                removed += self._quiet(self.nl.delete_policy, pol.dir, index=pol.index)
        for sa in self.nl.dump_sas():
            if self.owns_reqid(sa.reqid) and (sa.daddr, sa.spi, sa.proto) not in mine_sas:
                removed += self._quiet(self.nl.delete_sa, sa.daddr, sa.spi, sa.proto)
        if removed:
            log.info("xfrm: removed %d stale SAs/policies of ours", removed)
        return removed

    @staticmethod
    def _quiet(fn: Any, *args: Any, **kw: Any) -> int:
        try:
            fn(*args, **kw)
        except XfrmNotFound:
            return 0  # already gone (expired, or removed by someone else)
        return 1

    # -- the Datapath protocol --
    def apply(self, install: GroupInstall) -> None:
        if self._closed:
            raise PolicyError("the XFRM data path is closed")
        policy = install.policy
        refusal = source_auth_refusal(policy.source_auth, "xfrm")
        if refusal:  # fail closed: never install a group whose packets the kernel cannot verify
            raise PolicyError(f"group {policy.group!r}: {refusal}")
        wanted = self._wanted(install)
        g = self._groups.get(policy.key)
        if g is None:
            g = self._groups[policy.key] = _Group(policy, self._alloc_reqid())
        elif g.policy != policy and group_selector(g.policy) != group_selector(policy) and g.policies:
            self._remove_policies(g)
        g.policy = policy
        out = install.outbound
        out_key: SaKey | None = (out.dst, out.spi, PROTO_NUMBERS[out.protocol]) if out else None
        # A tunnel-mode SA's kernel source address is the outer source of what we send with it,
        # and the kernel cannot change it later (without one it sends from 0.0.0.0, which every
        # receiver drops as a martian). Our next per-sender SA arrives before its activation,
        # listed as inbound while the current one is still outbound: the owners map says it is
        # ours, so it gets our source when it is added. Any other SA that becomes outbound
        # without our source (a shared level's next SA) is added again before the switch.
        me = install.owners.get(out.spi) if out is not None else None
        ours = {k for k in wanted if k == out_key or (me is not None and install.owners.get(k[1]) == me)}
        tunnel_out = out is not None and out.mode == "tunnel"
        source = self._source_for(policy.dst) if tunnel_out and any(not wanted[k].src for k in ours) else None
        # 1. new (or changed) SAs in, before anything uses them
        for key, params in wanted.items():
            old = g.sas.get(key)
            need = (params.src or source or "") if key == out_key else None
            if old == params and (need is None or g.saddr.get(key) == need):
                continue
            if old is not None:  # changed, or about to send with an SA added without our source
                self._quiet(self.nl.delete_sa, *key)
                g.sas.pop(key)
            sa = kernel_sa_for(params, g.reqid, source if key in ours else None)
            try:
                self.nl.add_sa(sa)
            except XfrmExists:
                raise PolicyError(
                    f"SA {params.spi:#010x} to {params.dst} already exists in the kernel and is not ours "
                    "(another IPsec daemon?)") from None
            g.sas[key] = params
            g.saddr[key] = sa.saddr
            log.info("xfrm: added SA %#010x %s %s %s for %s", params.spi, params.protocol, params.suite,
                     params.mode, _name(policy))
        # 2. the policies: inbound template, outbound switch (or block)
        self._install_policies(g, out)
        g.out_spi, g.out_key = (out.spi if out else None), out_key
        # 3. SAs no longer listed
        for key in [k for k in g.sas if k not in wanted]:
            self._quiet(self.nl.delete_sa, *key)
            del g.sas[key]
            g.saddr.pop(key, None)
            log.info("xfrm: removed SA %#010x for %s", key[1], _name(policy))
        self._sockets(g, install)

    def remove_group(self, key: tuple[str, str]) -> None:
        g = self._groups.pop(key, None)
        if g is None:
            return
        for k in g.sas:  # SAs first: until the policies go, the group's traffic is dropped, not sent in clear
            self._quiet(self.nl.delete_sa, *k)
        if g.policies:
            self._remove_policies(g)
        for s in [g.join, *g.encap]:
            if s is not None:
                s.close()
        log.info("xfrm: removed group %s", _name(g.policy))

    def statistics(self) -> dict[str, Any]:
        by_key = {k: (g, p) for g in self._groups.values() for k, p in g.sas.items()}
        sas = []
        packets = octets = replay = auth = 0
        for sa in self.nl.dump_sas():
            hit = by_key.get((sa.daddr, sa.spi, sa.proto))
            if hit is None or not self.owns_reqid(sa.reqid):
                continue
            g, params = hit
            direction = "out" if g.out_key == (sa.daddr, sa.spi, sa.proto) else "in"
            sas.append({"group": g.policy.group, "level": g.policy.level, "spi": sa.spi, "direction": direction,
                        "protocol": params.protocol, "suite": params.suite, "mode": params.mode, "dst": sa.daddr,
                        "src": None if ipaddress.ip_address(sa.saddr).is_unspecified else sa.saddr,
                        "packets": sa.packets, "bytes": sa.octets,
                        "seq_out": sa.oseq, "seq_in": sa.seq,
                        "drops": {"replay": sa.replay_drops, "auth-failed": sa.integrity_failed}})
            packets, octets = packets + sa.packets, octets + sa.octets
            replay, auth = replay + sa.replay_drops, auth + sa.integrity_failed
        totals = {"packets": packets, "bytes": octets, "drops": {"replay": replay, "auth-failed": auth}}
        return {"datapath": "xfrm", "groups": len(self._groups), "sas": sas, "totals": totals,
                "kernel": read_xfrm_stat()}

    def close(self) -> None:
        """Remove every SA and policy of ours (and nothing else), then close the socket."""
        if self._closed:
            return
        try:
            for key in list(self._groups):
                try:
                    self.remove_group(key)
                except XfrmError as exc:
                    log.warning("xfrm: cleaning up %s: %s", key, exc)
            self.reconcile()
        finally:
            self._closed = True
            self.nl.close()

    def __enter__(self) -> XfrmDatapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers --
    def _wanted(self, install: GroupInstall) -> dict[SaKey, SAParams]:
        policy = install.policy
        wanted: dict[SaKey, SAParams] = {}
        for params in (*install.inbound, *((install.outbound,) if install.outbound else ())):
            if params.protocol != policy.protocol or params.mode != policy.mode:
                raise PolicyError(f"SA {params.spi:#010x} is {params.protocol}/{params.mode} but group "
                                  f"{_name(policy)} is {policy.protocol}/{policy.mode}")
            if ipaddress.ip_address(params.dst).version != ipaddress.ip_address(policy.dst).version:
                raise PolicyError(f"SA {params.spi:#010x} and group {_name(policy)} are of different IP versions")
            kernel_sa_for(params, 0)  # refuse what XFRM cannot do, before touching the kernel
            key = (params.dst, params.spi, PROTO_NUMBERS[params.protocol])
            other = wanted.get(key)
            if other is not None and other != params and not _same_sa(other, params):
                raise PolicyError(f"SPI {params.spi:#010x} is listed twice with different parameters")
            wanted.setdefault(key, params)
        return wanted

    def _alloc_reqid(self) -> int:
        used = {g.reqid for g in self._groups.values()}
        for _ in range(self.reqid_span):
            r = self._next_reqid
            self._next_reqid = r + 1 if r + 1 < self.reqid_base + self.reqid_span else self.reqid_base + 1
            if r not in used:
                return r
        raise PolicyError("no free reqid left in our range")

    def _install_policies(self, g: _Group, out: SAParams | None) -> None:
        pol = g.policy
        sel = group_selector(pol)
        fam = sel.family
        proto, mode = PROTO_NUMBERS[pol.protocol], _MODES[pol.mode]
        tunnel = mode == XFRM_MODE_TUNNEL
        inbound = PolicyInfo(sel, XFRM_POLICY_IN, XFRM_POLICY_ALLOW, self.priority,
                             (Template(fam, proto, mode, g.reqid, pol.dst if tunnel else None),))
        if out is None:
            outbound = PolicyInfo(sel, XFRM_POLICY_OUT, XFRM_POLICY_BLOCK, self.priority)
        else:
            src = (out.src or self._source_for(pol.dst)) if tunnel else None
            outbound = PolicyInfo(sel, XFRM_POLICY_OUT, XFRM_POLICY_ALLOW, self.priority,
                                  (Template(fam, proto, mode, g.reqid, out.dst if tunnel else None, src, out.spi),))
        for p in (inbound, outbound):
            self.nl.add_policy(p, update=True)  # UPDPOLICY creates or replaces
        g.policies = True

    def _remove_policies(self, g: _Group) -> None:
        sel = group_selector(g.policy)
        for p in self.nl.dump_policies():
            if p.selector == sel and p.dir in (XFRM_POLICY_IN, XFRM_POLICY_OUT) and self.owns_policy(p):
                self._quiet(self.nl.delete_policy, p.dir, index=p.index)
        g.policies = False

    def _source_for(self, dst: str) -> str:
        if self.interface is not None and self.interface.family == family_of(dst):
            return self.interface.address
        with socket.socket(family_of(dst), socket.SOCK_DGRAM) as s:
            try:
                s.connect((dst, 9))
            except OSError as exc:
                raise PolicyError(f"no route to {dst} to choose the outer source address: {exc.strerror}") from None
            return str(s.getsockname()[0])

    def _sockets(self, g: _Group, install: GroupInstall) -> None:
        """Join the group when we receive (if an interface is configured), and hold a UDP
        socket with UDP_ENCAP on the ESP-in-UDP port so that the kernel decapsulates it."""
        pol = g.policy
        receiving = bool(install.inbound)
        fam = family_of(pol.dst)
        ports = {p.udp_encap_port for p in install.inbound if p.udp_encap_port}
        have = {s.getsockname()[1] for s in g.encap}
        for s in [s for s in g.encap if s.getsockname()[1] not in ports]:
            s.close()
            g.encap.remove(s)
        for port in sorted(ports - have):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((pol.dst, port))
                s.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
                if self.interface is not None:
                    join_group(s, pol.dst, self.interface, pol.src)
            except OSError as exc:
                s.close()
                raise PolicyError(f"cannot open the ESP-in-UDP socket on port {port}: {exc.strerror}") from None
            g.encap.append(s)
        if receiving and self.interface is not None and g.join is None and not g.encap:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            try:
                join_group(s, pol.dst, self.interface, pol.src)
            except OSError as exc:
                s.close()
                raise PolicyError(f"cannot join {pol.dst} on {self.interface.name}: {exc.strerror}") from None
            g.join = s
        elif (not receiving or g.encap) and g.join is not None:
            g.join.close()
            g.join = None


def _same_sa(a: SAParams, b: SAParams) -> bool:
    """The same kernel SA listed as inbound and outbound (the replay window may differ)."""
    return (a.suite, a.enc_key, a.auth_key, a.mode, a.udp_encap_port) == (b.suite, b.enc_key, b.auth_key, b.mode,
                                                                           b.udp_encap_port)


def _name(policy: GroupPolicy) -> str:
    return policy.group + (f"/{policy.level}" if policy.level else "")


def read_xfrm_stat(path: str = "/proc/net/xfrm_stat") -> dict[str, int]:
    """The kernel's XFRM error counters for this network namespace (all IPsec users, not only ours)."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit() and int(parts[1]):
                    out[parts[0]] = int(parts[1])
    except OSError:
        pass
    return out
