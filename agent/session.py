"""The agent's control session: a trio shell around ``groupsec.protocol.member``.

    session = AgentSession(config, bundle, datapath)
    async with trio.open_nursery() as n:
        await n.start(session.run)      # returns once the first registration succeeded
        ...
        session.statistics()            # counters, installed SAs, connection state

What it does (everything protocol-related is decided by the pure ``MemberProtocol``):
* connects to the controller (configured address, or zeroconf discovery through
  ``agent.discovery``) over TLS 1.3 with the bundle's certificate, verifying the controller
  against the bundle's CA only; registers; keeps the session open (Ping/Pong);
* reconnects with exponential backoff and jitter; installed SAs stay in the data path while
  disconnected, and the re-registration reports the message IDs held (re-sync);
* listens on each group's rekey channel (policy.rekey_addr:rekey_port) and feeds every
  datagram to the member state machine, which verifies it (signature, KEK, msg_id, group),
  detects gaps and asks for a Resync; acks are sent with jitter;
* maps the member's desired state onto ``Datapath.apply(GroupInstall)`` / ``remove_group``
  as it changes (ATD/DTD timers included).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from agent.config import AgentConfig, Bundle
from agent.datapath.base import Datapath, GroupInstall
from groupsec.errors import ConfigError, GroupSecError, RemoteProtocolError
from groupsec.protocol.framing import FrameDecoder, encode_frame
from groupsec.protocol.member import (
    ControllerError,
    DesiredInstall,
    GroupRemoved,
    InstallChanged,
    KeepaliveTimeout,
    MemberProtocol,
    RegisteredEvent,
    RekeyApplied,
    RekeyRejected,
    ResyncRequested,
    kek_id,
)
from groupsec.protocol.messages import Bye, GroupRequest, Message, RekeyPush, decode_message_untrusted

log = logging.getLogger("groupsec.agent.session")

FATAL_CODES = ("revoked", "not-authorized", "unknown-group", "unsupported-version")
SEND_QUEUE = 1024
CONN_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)
RECV_CHUNK = 65536
APPLIED_HISTORY = 64  # the last rekeys/grants applied, in status.json (what each msg_id meant)


def client_context(bundle: Bundle) -> ssl.SSLContext:
    """TLS 1.3 only, our CA as the only anchor, our certificate for mutual authentication."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cadata=bundle.ca_pem.decode())
        ctx.load_cert_chain(str(bundle.cert_path), str(bundle.key_path))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{bundle.path}: the credential bundle's key, certificate or CA is unusable: {exc}") from None
    return ctx


def _sa_id(enc_key: bytes, auth_key: bytes) -> str:
    """A public name for an SA's keys (like member.kek_id): never reversible into them."""
    return hashlib.sha256(b"groupsec-sa-id\0" + enc_key + b"\0" + auth_key).hexdigest()[:16]


def _rand() -> float:
    return secrets.randbelow(1_000_000) / 1_000_000


class AgentSession:
    def __init__(self, config: AgentConfig, bundle: Bundle, datapath: Datapath, *,
                 discover: Callable[..., Awaitable[list[tuple[str, int, str | None]]]] | None = None) -> None:
        self.config = config
        self.bundle = bundle
        self.datapath = datapath
        self.member = MemberProtocol(
            [GroupRequest(g.group, g.role, g.level) for g in config.groups],
            ack_jitter=config.ack_jitter, ping_interval=config.ping_interval, ping_timeout=config.ping_timeout,
            ca_pem=bundle.ca_pem)
        self._ctx = client_context(bundle)
        self._discover = discover
        self._send: trio.MemorySendChannel[Message] | None = None
        self._conn_scope: trio.CancelScope | None = None
        self._wakeup = trio.Event()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._channels: dict[tuple[str, int, str], trio.CancelScope] = {}  # rekey channel sockets
        self._registered = trio.Event()
        self._fatal: str | None = None
        self.controller: tuple[str, int] | None = None
        self.installed: dict[tuple[str, str], DesiredInstall] = {}
        self.counters: dict[str, int] = {"connects": 0, "connect_failures": 0, "disconnects": 0,
                                         "rekey_datagrams": 0, "test_dropped": 0, "push_ignored": 0,
                                         "apply_errors": 0}
        self.rejected_log: list[tuple[str, str]] = []  # (reason, source), the most recent 50
        self.applied: list[dict[str, Any]] = []  # the most recent APPLIED_HISTORY, see _record_applied
        self.last_error = ""
        self.connected = False

    # ---- public ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[AgentSession] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs until cancelled (or until the controller refuses us for good: ConfigError)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._connect_loop)
            await self._registered.wait()
            task_status.started(self)

    @property
    def registered(self) -> trio.Event:
        return self._registered

    def now(self) -> float:
        return trio.current_time()

    def statistics(self) -> dict[str, Any]:
        now = self.now()
        m = self.member.statistics(now)
        groups = []
        for key, inst in sorted(self.installed.items()):
            g = next((x for x in m["groups"] if (x["group"], x["level"]) == key), {})
            expiry = {s["spi"]: s["expires_in"] for s in g.get("sas", [])}
            deact = self._deactivations(key)
            sas = [{"spi": f"{p.spi:#010x}", "direction": "in", "sender": _sender(p),
                    "expires_in": _min(expiry.get(p.spi), deact.get(p.spi))} for p in inst.inbound]
            if inst.outbound is not None:
                p = inst.outbound
                sas.append({"spi": f"{p.spi:#010x}", "direction": "out", "sender": _sender(p),
                            "expires_in": _min(expiry.get(p.spi), deact.get(p.spi))})
            groups.append({"group": key[0], "level": key[1], "role": g.get("role"), "dst": inst.policy.dst,
                           "msg_id": g.get("msg_id"), "kek_epoch": g.get("kek_epoch"), "kek_id": g.get("kek_id"),
                           "sender_id": g.get("sender_id"), "sas": sas})
        return {"member": m["member"], "state": m["state"], "connected": self.connected,
                "controller": f"{self.controller[0]}:{self.controller[1]}" if self.controller else None,
                "last_error": self.last_error, "groups": groups,
                "counters": {**self.counters, **m["counters"]}, "rejected": m["rejected"],
                "applied": list(self.applied)}

    def _record_applied(self, key: tuple[str, str], msg_id: int, kind: str, source: str) -> None:
        """What this msg_id left us holding, by public fingerprints only: the KEK (epoch, id),
        the newest SA generation and every SA (SPI -> key id). Two members (or one member
        at two times) that applied the same msg_id must agree on the KEK and newest TEK: a
        disagreement means two different messages carried one msg_id (split-brain)."""
        st = self.member.levels.get(key)
        if st is None:
            return
        sas = {f"{spi:#010x}": _sa_id(sa.params.enc_key, sa.params.auth_key) for (spi, _d), sa in st.sas.items()}
        newest = max((sa.grant.activate_at or 0.0 for sa in st.sas.values()), default=0.0)
        tek = sorted({f"{spi:#010x}" for (spi, _d), sa in st.sas.items() if (sa.grant.activate_at or 0.0) == newest})
        self.applied = [*self.applied[-(APPLIED_HISTORY - 1):], {
            "group": key[0], "level": key[1], "msg_id": msg_id, "kind": kind, "source": source,
            "kek_epoch": st.kek_epoch, "kek_id": kek_id(st.keks.get(st.kek_epoch, b"")), "newest": tek, "sas": sas}]

    def _deactivations(self, key: tuple[str, str]) -> dict[int, float]:
        st = self.member.levels.get(key)
        if st is None:
            return {}
        now = self.now()
        return {spi: round(sa.grant.deactivate_at - self.member.offset - now, 3)
                for (spi, _), sa in st.sas.items() if sa.grant.deactivate_at is not None}

    # ---- the state machine pump ---------------------------------------------------------------

    def _pump(self) -> None:
        """Send what the member queued, act on its events, and re-arm the timer."""
        for msg in self.member.messages_to_send():
            if self._send is None:
                continue  # no session: the state machine re-sends what matters after reconnecting
            try:
                self._send.send_nowait(msg)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._drop_connection("send queue full or closed")
        changed = False
        while (ev := self.member.next_event()) is not None:
            self._on_event(ev)
            changed = changed or isinstance(ev, (InstallChanged, GroupRemoved, RegisteredEvent, RekeyApplied))
        if changed:
            self._changed.set()
        self._wakeup.set()

    async def member_changed(self) -> None:
        """Wait until the installed state, the registration or the rekey state changes."""
        await self._changed.wait()
        self._changed = trio.Event()

    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, InstallChanged):
            inst = ev.install
            try:
                self.datapath.apply(GroupInstall(inst.policy, inst.inbound, inst.outbound, dict(inst.sender_keys),
                                                 dict(inst.owners), inst.signing_key))
            except GroupSecError as exc:
                self.counters["apply_errors"] += 1
                log.error("data path refused %s: %s", inst.policy.key, exc)
                return
            self.installed[inst.policy.key] = inst
            self._ensure_channel(inst.policy)
            log.debug("installed %s: in=%s out=%s", inst.policy.key, [f"{p.spi:#x}" for p in inst.inbound],
                      f"{inst.outbound.spi:#x}" if inst.outbound else None)
        elif isinstance(ev, GroupRemoved):
            self.installed.pop(ev.key, None)
            self.datapath.remove_group(ev.key)
            log.warning("group %s/%s is no longer granted: removed", *ev.key)
        elif isinstance(ev, RegisteredEvent):
            log.info("registered as %s: %s", ev.member, ", ".join(f"{g}/{lv}" if lv else g for g, lv in ev.groups))
            for key in ev.groups:
                st = self.member.levels.get(key)
                if st is not None:
                    self._record_applied(key, st.msg_id, "grant", "register")
            self._registered.set()
        elif isinstance(ev, RekeyRejected):
            log.warning("rekey rejected (%s, via %s): %s", ev.reason, ev.source, ev.detail)
            self.rejected_log = [*self.rejected_log[-49:], (ev.reason, ev.source)]
        elif isinstance(ev, RekeyApplied):
            self._record_applied(ev.key, ev.msg_id, ev.kind, ev.source)
            log.info("rekey %s/%s msg_id %d (KEK epoch %d) applied from %s", ev.key[0], ev.key[1] or "-",
                     ev.msg_id, ev.kek_epoch, ev.source)
        elif isinstance(ev, ResyncRequested):
            log.info("resync %s/%s since msg_id %d (%s)", ev.key[0], ev.key[1] or "-", ev.since_msg_id, ev.why)
        elif isinstance(ev, KeepaliveTimeout):
            self._drop_connection("keepalive timeout")
        elif isinstance(ev, ControllerError):
            self.last_error = f"{ev.code}: {ev.message}"
            log.error("controller ended the session: %s", self.last_error)
            if ev.code in FATAL_CODES:
                self._fatal = ev.code
            self._drop_connection(ev.code)

    def _drop_connection(self, why: str) -> None:
        if self._conn_scope is not None:
            log.info("dropping the controller connection: %s", why)
            self._conn_scope.cancel()

    async def _timer_loop(self) -> None:
        while True:
            t = self.member.get_timer()
            self._wakeup = trio.Event()
            with trio.move_on_at(t if t is not None else math.inf):
                await self._wakeup.wait()
            now = self.now()
            t = self.member.get_timer()
            if t is not None and now >= t:
                self.member.handle_timer(now)
                self._pump()

    # ---- the controller connection ------------------------------------------------------------

    async def _targets(self) -> list[tuple[str, int, str | None]]:
        """(host, port, tls server name or None for discovered controllers)."""
        if len(self.config.controllers) > 1:  # several controllers (HA): start after the last one used
            ctls = list(self.config.controllers)
            if self.controller in ctls:
                i = ctls.index(self.controller)
                ctls = ctls[i + 1:] + ctls[:i + 1]
            return [(h, p, h) for h, p in ctls]
        if self.config.controller is not None:
            host, port = self.config.controller
            return [(host, port, host)]
        if self.bundle.controller_hint is not None and not self.config.discover:
            host, port = self.bundle.controller_hint
            return [(host, port, host)]
        if self._discover is None:
            from agent.discovery import discover

            self._discover = discover
        return await self._discover(self.bundle.ca_fingerprint, self.config.discovery_timeout)

    async def _connect_loop(self) -> None:
        delay = self.config.reconnect_min
        while True:
            ok = False
            try:
                targets = await self._targets()
            except (OSError, GroupSecError) as exc:
                targets = []
                self.last_error = f"discovery: {exc}"
            for host, port, name in targets:
                try:
                    ok = await self._connect_once(host, port, name)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError,
                        trio.TooSlowError, RemoteProtocolError) as exc:
                    self.counters["connect_failures"] += 1
                    detail = exc.__cause__ or exc  # trio wraps ssl.SSLError in BrokenResourceError
                    self.last_error = f"{host}:{port}: {type(detail).__name__}: {detail}"[:300]
                    log.warning("controller %s", self.last_error)
                finally:
                    self.connected = False
                    self.member.connection_lost(self.now())
                    self._pump()
                if ok:
                    break
            if self._fatal is not None:
                # revoked / not authorized: retrying quickly will not help; keep the SAs that are
                # still valid and retry slowly (an operator may fix the registry)
                delay = self.config.reconnect_max
                self._fatal = None
            elif ok:
                delay = self.config.reconnect_min
            sleep = delay * (0.5 + _rand())  # jitter: spread a thousand agents after a restart
            log.info("reconnecting in %.1f s", sleep)
            await trio.sleep(sleep)
            delay = min(delay * 2, self.config.reconnect_max)

    async def _connect_once(self, host: str, port: int, server_name: str | None) -> bool:
        """One session. Returns True if it registered (then the backoff restarts)."""
        registered_before = self.member.counters["registrations"]
        ctx = self._ctx
        if server_name is None:  # discovered: the CA + serverAuth EKU + TXT fingerprint vouch
            ctx = client_context(self.bundle)
            ctx.check_hostname = False
        with trio.fail_after(self.config.handshake_timeout):
            tcp = await trio.open_tcp_stream(host, port)
            stream = trio.SSLStream(tcp, ctx, server_hostname=server_name or host)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        self.controller = (host, port)
        self.counters["connects"] += 1
        self.connected = True
        send, recv = trio.open_memory_channel[Message](SEND_QUEUE)
        try:
            with trio.CancelScope() as scope:
                self._conn_scope = scope
                self._send = send
                async with trio.open_nursery() as n:
                    n.start_soon(self._writer, stream, recv)
                    self.member.connect(self.now())
                    self._pump()
                    await self._reader(stream)
                    n.cancel_scope.cancel()
        finally:
            self._send = None
            self._conn_scope = None
            self.counters["disconnects"] += 1
            if self.member.state == "registered":
                with trio.move_on_after(0.5) as cs:
                    cs.shield = True
                    try:
                        await stream.send_all(encode_frame(Bye("agent stopping").encode()))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
                        pass
            await trio.aclose_forcefully(stream)
        return self.member.counters["registrations"] > registered_before

    async def _writer(self, stream: trio.SSLStream[Any], recv: trio.MemoryReceiveChannel[Message]) -> None:
        try:
            async for msg in recv:
                await stream.send_all(encode_frame(msg.encode()))
        except CONN_ERRORS as exc:
            self.last_error = f"send: {type(exc).__name__}: {exc}"[:300]
            self._drop_connection(self.last_error)

    async def _reader(self, stream: trio.SSLStream[Any]) -> None:
        try:
            await self._read_frames(stream)
        except RemoteProtocolError as exc:
            # the controller sent something invalid: tell it (best effort) and reconnect
            self.last_error = f"protocol error ({exc.code}): {exc}"[:300]
            log.error("%s", self.last_error)
        except CONN_ERRORS as exc:
            self.last_error = f"receive: {type(exc).__name__}: {exc}"[:300]
            log.warning("%s", self.last_error)

    async def _read_frames(self, stream: trio.SSLStream[Any]) -> None:
        dec = FrameDecoder()
        ignore_push = self.config.testing.ignore_unicast_rekey
        while True:
            data = await stream.receive_some(RECV_CHUNK)
            if not data:
                log.info("controller closed the connection")
                return
            dec.feed(data)
            while (frame := dec.next_frame()) is not None:
                msg = decode_message_untrusted(frame)
                if ignore_push and isinstance(msg, RekeyPush):
                    self.counters["push_ignored"] += 1
                    continue
                self.member.receive_message(msg, self.now())
                self._pump()
                if self.member.state == "closed":
                    return

    # ---- rekey channels -----------------------------------------------------------------------

    def _ensure_channel(self, policy: Any) -> None:
        if policy.rekey_addr is None or policy.rekey_port is None or self._nursery is None:
            return
        key = (policy.rekey_addr, policy.rekey_port, policy.src or "")
        if key in self._channels:
            return
        from agent.datapath import sockets as so

        try:
            iface = so.resolve_interface(self.config.interface, so.family_of(policy.rekey_addr))
            sock = so.open_multicast_rx(policy.rekey_addr, policy.rekey_port, iface, None)
        except ConfigError as exc:
            log.error("rekey channel %s:%d: %s (rekeys still arrive over TLS)", policy.rekey_addr,
                      policy.rekey_port, exc)
            return
        scope = trio.CancelScope()
        self._channels[key] = scope
        self._nursery.start_soon(self._channel_loop, sock, scope)
        log.info("listening for rekeys on %s:%d via %s", policy.rekey_addr, policy.rekey_port, iface.name)

    async def _channel_loop(self, sock: socket.socket, scope: trio.CancelScope) -> None:
        drop = self.config.testing.drop_multicast_rekey
        with scope, sock:
            while True:
                await trio.lowlevel.wait_readable(sock)
                while True:
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        break
                    self.counters["rekey_datagrams"] += 1
                    if drop and _rand() < drop:
                        self.counters["test_dropped"] += 1
                        continue
                    self.member.receive_datagram(data, self.now(), "multicast")
                    self._pump()


def _sender(p: Any) -> str:
    if p.sender_id is not None:
        return f"id {p.sender_id}"
    if p.src:
        return p.src
    return "any (shared)" if p.sender_id_bits else "any"


def _min(a: float | None, b: float | None) -> float | None:
    vals = [v for v in (a, b) if v is not None]
    return min(vals) if vals else None
