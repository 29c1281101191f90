"""The embedded userspace data path: ESP/AH in Python, no kernel IPsec needed.

    dp = UserspaceDatapath(UserspaceConfig(interface="eth0", relays={"video": RelayConfig(
        listen=("127.0.0.1", 6000), deliver=("127.0.0.1", 6001))}))
    await nursery.start(dp.run)           # owns the sockets and tasks until cancelled
    dp.apply(GroupInstall(policy, inbound=(...), outbound=...))   # whenever keys change
    async with dp.open_socket(policy.key) as gs: ...              # the embedded API

On the wire: RFC 3948 ESP-in-UDP on ``policy.udp_encap_port`` (unprivileged), or ESP/AH
directly in IPv4 over raw sockets when the policy has no encapsulation port (needs
CAP_NET_RAW). Applications reach a group through the local relay (``relays``), the TUN
device (``tun``), or ``GroupSocket``; any combination at once.

Fail closed, and what this path can and cannot see:
* non-ESP datagrams on the encapsulation port, unknown SPIs, ICV failures, replays and
  decrypted packets outside the group's selectors are dropped and counted (per group,
  and per SA by the engine);
* unprotected UDP to the group's selector port is counted as ``plaintext``: by a guard
  socket bound to (group, port) on the encapsulation path, by a raw UDP observer on the
  raw path. Relay and GroupSocket applications never receive it. A TUN-mode application
  whose socket keeps IP_MULTICAST_ALL on (the Linux default) can still be handed such a
  packet by the kernel when the agent joined the group on the wire interface: blocking
  that needs the XFRM data path (kernel policy);
* a receive-only member (no outbound SA) refuses to send: ``ReceiveOnly`` to API callers,
  a ``receive-only`` drop in the relay and TUN counters. This is policy, not protection
  against forgery: every member holds the group key.

Source-origin authentication (``policy.source_auth`` "sign" / "sign-batched"): the engine
signs what this member sends and drops, as ``source-auth-failed``, every packet that its
named sender did not sign (docs/PROTOCOL.md). With "sign-batched" a per-group timer task
sends each window when it closes (``max_packets`` packets or ``max_delay`` after its first
packet), and removing a group or stopping the data path flushes the open window first.
Only the ESP-in-UDP wire carries signatures: a source-authenticated group on the raw wire
is refused with a ``PolicyError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from agent.datapath import sockets as so
from agent.datapath.base import GroupInstall
from agent.datapath.engine import GroupEngine
from agent.datapath.groupsocket import GroupSocket
from agent.datapath.relay import Relay, RelayConfig
from agent.datapath.tun import TunDevice
from agent.datapath.wire import DEFAULT_RCVBUF, DEFAULT_SNDBUF, EncapWire, PlaintextGuard, RawWire
from groupsec.errors import ConfigError, LocalProtocolError
from groupsec.ipsec.policy import GroupPolicy

__all__ = ["GroupSocket", "RelayConfig", "TunConfig", "UserspaceConfig", "UserspaceDatapath", "group_name"]


def group_name(key: tuple[str, str]) -> str:
    """``"video"`` or ``"video/high"``: the key of ``UserspaceConfig.relays`` and of statistics."""
    return f"{key[0]}/{key[1]}" if key[1] else key[0]


@dataclass(frozen=True, slots=True)
class TunConfig:
    name: str = "gsec0"
    mtu: int = 1400
    groups: frozenset[str] | None = None  # group names routed into the TUN; None: every group


@dataclass(frozen=True)
class UserspaceConfig:
    interface: str | None = None  # wire interface, by name or address; None: loopback
    ttl: int = 1  # multicast TTL / hop limit on the wire
    loop: bool | None = None  # multicast loopback; None: on for a loopback interface only
    wire: Literal["auto", "encap", "raw"] = "auto"  # auto: raw when policy.udp_encap_port is None
    relays: Mapping[str, RelayConfig] = field(default_factory=dict)
    tun: TunConfig | None = None
    guard: bool = True  # count plaintext arriving on the group's selector port
    rcvbuf: int = DEFAULT_RCVBUF
    sndbuf: int = DEFAULT_SNDBUF
    socket_queue: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.ttl <= 255:
            raise ConfigError(f"ttl {self.ttl} is outside 1..255")
        if self.wire not in ("auto", "encap", "raw"):
            raise ConfigError(f"wire {self.wire!r} is not one of auto, encap, raw")


class _Group:
    """Everything one group (level) owns in the data path."""

    def __init__(self, engine: GroupEngine) -> None:
        self.engine = engine
        self.wire: EncapWire | None = None  # None: the shared RawWire
        self.relay: Relay | None = None
        self.guard: PlaintextGuard | None = None
        self.tun: TunDevice | None = None
        self.sockets: list[GroupSocket] = []
        self.scope = trio.CancelScope()
        self.send: Callable[[Any], None] = lambda data: None
        self.timer_armed = trio.Event()  # set when a "sign-batched" window opens
        engine.on_timer_armed = lambda: self.timer_armed.set()
        self.transmit: Callable[[bytes], Any] = None  # type: ignore[assignment]

    def deliver(self, pkt: Any, payload: Any) -> None:
        if self.relay is not None:
            self.relay.deliver(pkt, payload)
        if self.tun is not None:
            self.tun.write(pkt)
        for gs in self.sockets:
            gs._deliver(pkt, payload)

    def flush(self) -> None:
        """Send the open "sign-batched" window now (before the group's sockets close)."""
        for data in self.engine.flush():
            self.send(data)

    async def sign_timer(self, clock: Callable[[], float]) -> None:
        """Close "sign-batched" windows on time: at most ``max_delay`` after their first packet."""
        engine = self.engine
        while True:
            t = engine.get_timer()
            if t is None:
                await self.timer_armed.wait()
                self.timer_armed = trio.Event()
                continue
            delay = t - clock()
            if delay > 0:
                await trio.sleep(delay)
            for data in engine.handle_timer(clock()):
                self.send(data)

    def close(self) -> None:
        """Stop the group's tasks; they close the sockets once they no longer wait on them."""
        self.scope.cancel()
        for gs in list(self.sockets):
            gs.close()

    def close_sockets(self) -> None:
        for obj in (self.wire, self.relay, self.guard):
            if obj is not None:
                obj.close()


class UserspaceDatapath:
    """Implements ``agent.datapath.base.Datapath``. ``apply``/``remove_group`` may be called
    before ``run`` starts (they take effect when it does) or while it runs."""

    def __init__(self, config: UserspaceConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or UserspaceConfig()
        self._clock = clock
        self._groups: dict[tuple[str, str], _Group] = {}
        self._pending: dict[tuple[str, str], GroupInstall | None] = {}
        self._nursery: trio.Nursery | None = None
        self._ifaces: dict[int, so.Interface] = {}
        self.raw: RawWire | None = None
        self.tun: TunDevice | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[UserspaceDatapath] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                if self.config.tun is not None:
                    self.tun = TunDevice(self.config.tun.name, self.config.tun.mtu, clock=self._clock)
                    nursery.start_soon(self.tun.read_loop)
                self._nursery = nursery
                pending, self._pending = self._pending, {}
                for key, install in pending.items():
                    if install is None:
                        self.remove_group(key)
                    else:
                        self.apply(install)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            for key in list(self._groups):
                self.remove_group(key)
            self._nursery = None
            if self.raw is not None:
                self.raw.close()
                self.raw = None
            if self.tun is not None:
                self.tun.close()
                self.tun = None

    # --- the Datapath protocol -----------------------------------------------------------

    def apply(self, install: GroupInstall) -> None:
        key = install.policy.key
        if self._nursery is None:
            self._pending[key] = install
            return
        g = self._groups.get(key)
        if g is not None and _same_sockets(g.engine.policy, install.policy):
            g.engine.apply(install, self._clock())
            return
        if g is not None:
            self.remove_group(key)
        self._start(install)

    def remove_group(self, key: tuple[str, str]) -> None:
        if self._nursery is None:
            self._pending[key] = None
            return
        g = self._groups.pop(key, None)
        if g is None:
            return
        if g.wire is None and self.raw is not None:
            self.raw.remove_group(g.engine)
        if g.tun is not None:
            g.tun.remove_group(g.engine)
        g.flush()
        g.close()

    def statistics(self) -> dict[str, Any]:
        groups = {}
        totals = {"tx_packets": 0, "rx_packets": 0, "drops": 0}
        for key, g in self._groups.items():
            st = g.engine.statistics()
            st["wire_stats"] = g.wire.statistics() if g.wire is not None else None
            st["relay"] = g.relay.statistics() if g.relay is not None else None
            st["sockets"] = [gs.statistics() for gs in g.sockets]
            groups[group_name(key)] = st
            totals["tx_packets"] += st["tx_packets"]
            totals["rx_packets"] += st["rx_packets"]
            totals["drops"] += sum(st["drops"].values())
        return {"datapath": "userspace", "groups": groups, "totals": totals,
                "raw": self.raw.statistics() if self.raw is not None else None,
                "tun": self.tun.statistics() if self.tun is not None else None}

    # --- application interfaces ------------------------------------------------------------

    def open_socket(self, key: tuple[str, str], *, sport: int = 0, dport: int | None = None,
                    queue: int | None = None) -> GroupSocket:
        g = self._groups.get(key)
        if g is None:
            raise LocalProtocolError(f"group {group_name(key)!r} is not installed in this data path")
        gs = GroupSocket(g.engine, g.transmit, sport=sport, dport=dport, queue=queue or self.config.socket_queue,
                         on_close=lambda s: g.sockets.remove(s) if s in g.sockets else None, clock=self._clock)
        g.sockets.append(gs)
        return gs

    def relay_address(self, key: tuple[str, str]) -> tuple[str, int] | None:
        """Where applications send plaintext for this group (the relay's bound address)."""
        g = self._groups.get(key)
        return g.relay.listen_address if g is not None and g.relay is not None else None

    # --- internals ---------------------------------------------------------------------------

    def _iface(self, family: int) -> so.Interface:
        if family not in self._ifaces:
            self._ifaces[family] = so.resolve_interface(self.config.interface, family)
        return self._ifaces[family]

    def _wire_kind(self, pol: GroupPolicy) -> str:
        kind = self.config.wire
        if kind == "auto":
            kind = "encap" if pol.udp_encap_port is not None else "raw"
        if kind == "encap" and pol.udp_encap_port is None:
            raise ConfigError(f"group {pol.group!r}: wire 'encap' needs a udp_encap_port in the group policy")
        if kind == "raw" and not so.privileged():
            raise ConfigError(f"group {pol.group!r}: raw ESP/AH needs CAP_NET_RAW; "
                              "run as root or give the group a udp_encap_port")
        return kind

    def _start(self, install: GroupInstall) -> None:
        assert self._nursery is not None
        pol = install.policy
        cfg = self.config
        iface = self._iface(so.family_of(pol.dst))
        kind = self._wire_kind(pol)
        src = pol.src if pol.src is not None else iface.address
        engine = GroupEngine(install, "raw" if kind == "raw" else "encap", src, self._clock())
        g = _Group(engine)
        loop = cfg.loop if cfg.loop is not None else iface.is_loopback
        name = group_name(pol.key)
        try:
            if kind == "encap":
                assert pol.udp_encap_port is not None
                g.wire = EncapWire(engine, iface, pol.udp_encap_port, ttl=cfg.ttl, loop=loop, rcvbuf=cfg.rcvbuf,
                                   sndbuf=cfg.sndbuf, clock=self._clock)
                g.wire.deliver = g.deliver
                g.send, g.transmit = g.wire.send, g.wire.send_wait
                if cfg.guard and pol.port is not None and pol.port != pol.udp_encap_port:
                    ignore = {self.tun.index} if self.tun is not None else set()
                    g.guard = PlaintextGuard(engine, iface, pol.port, ignore)
            else:
                if self.raw is None:
                    try:
                        self.raw = RawWire(iface, rcvbuf=cfg.rcvbuf, sndbuf=cfg.sndbuf, clock=self._clock)
                    except OSError as exc:
                        raise ConfigError(f"group {name!r}: cannot open raw ESP/AH sockets on {iface.name}: "
                                          f"{exc.strerror}") from None
                    for proto in list(self.raw.rx):
                        self._nursery.start_soon(self.raw.receive_loop, proto)
                self.raw.add_group(engine, g.deliver)
                g.send, g.transmit = self.raw.send, self.raw.send_wait
            relay_cfg = cfg.relays.get(name)
            if relay_cfg is not None:
                g.relay = Relay(engine, relay_cfg, g.send, rcvbuf=cfg.rcvbuf, sndbuf=cfg.sndbuf, clock=self._clock)
            if self.tun is not None and (cfg.tun is None or cfg.tun.groups is None or name in cfg.tun.groups):
                self.tun.add_group(engine, g.send)
                g.tun = self.tun
        except BaseException:
            if g.wire is None and self.raw is not None:
                self.raw.remove_group(engine)
            g.close()
            g.close_sockets()
            raise
        self._groups[pol.key] = g
        self._nursery.start_soon(self._group_tasks, g, self._clock)

    @staticmethod
    async def _group_tasks(g: _Group, clock: Callable[[], float]) -> None:
        try:
            with g.scope:
                async with trio.open_nursery() as n:
                    # the sockets live until the group is removed (close() cancels the scope), also when
                    # no task waits on them (a receive-only relay on the shared raw wire)
                    n.start_soon(trio.sleep_forever)
                    if g.wire is not None:
                        n.start_soon(g.wire.receive_loop)
                    if g.relay is not None:
                        n.start_soon(g.relay.send_loop)
                    if g.guard is not None:
                        n.start_soon(g.guard.receive_loop)
                    if g.engine.policy.source_auth == "sign-batched":
                        n.start_soon(g.sign_timer, clock)
        finally:
            g.close_sockets()


def _same_sockets(a: GroupPolicy, b: GroupPolicy) -> bool:
    """Can ``b`` be applied to the sockets opened for ``a``?"""
    return all(getattr(a, f) == getattr(b, f)
               for f in ("dst", "src", "udp_encap_port", "port", "protocol", "ip_proto", "source_auth"))
