"""The member (group member / agent) side of the control protocol, as a pure state machine.

No I/O and no clock: the trio shell (agent/session.py) feeds it decoded control messages
and raw rekey datagrams, passes the current time ``now`` (any monotonic time base; the
controller's wall-clock times are mapped onto it with the offset learned from
``Registered.server_time``), sends what :meth:`MemberProtocol.messages_to_send` returns,
arms one timer from :meth:`get_timer` and hands the desired data path state of each group
level (``GroupInstall``) to the data path when :meth:`next_event` yields
:class:`InstallChanged`.

Session states and the messages each accepts live in one table, ``TRANSITIONS``; a message
with no entry raises ``RemoteProtocolError(code="unexpected-message")`` and the shell closes
the session. Group state (SAs, KEKs, message IDs) outlives a session: after a reconnect the
member registers again with ``known`` message IDs and keeps every SA that is still valid.

Rekeys (multicast datagrams or RekeyPush over TLS) are verified by
``groupsec.protocol.rekey.open_rekey_untrusted``; rejections are counted per reason in
``statistics()["rejected"]`` and reported as :class:`RekeyRejected` events (never with keys).
A skipped message ID, a heartbeat with a newer one, or a signed rekey under a KEK epoch we
do not hold, queues a ``Resync``. Applied rekeys are acknowledged after a random delay.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from groupsec.errors import BadRekey, LocalProtocolError, RemoteProtocolError
from groupsec.ipsec.params import SAParams
from groupsec.protocol.member_lkh import apply_tree_update, has_tree_update, tree_from_grant
from groupsec.protocol.member_state import (
    _SA,
    MAX_SAS_PER_LEVEL,
    ControllerError,
    DesiredInstall,
    Event,
    GroupRemoved,
    InstallChanged,
    KeepaliveTimeout,
    Key,
    LevelState,
    RegisteredEvent,
    RekeyApplied,
    RekeyRejected,
    ResyncRequested,
    _owners,
    _signing_key,
    kek_id,
)
from groupsec.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Error,
    Grant,
    GroupRequest,
    Message,
    Ping,
    Pong,
    Register,
    Registered,
    RekeyPush,
    Resync,
    ResyncReply,
)
from groupsec.protocol.rekeycert import verify_rekey_cert_untrusted

RESYNC_RETRY = 5.0
# No valid datagram on the rekey channel for SILENCE heartbeat intervals: ask over TLS. With
# 1.5, a member that lost a rekey and the next heartbeat still converges within 2 intervals.
SILENCE = 1.5  # seconds before a Resync without answer is sent again
KEEP_KEKS = 2  # KEK epochs kept per group level (the current and the previous one)


def _uniform(high: float) -> float:
    """A random delay in [0, high) (secrets: no home-made randomness)."""
    if high <= 0:
        return 0.0
    return secrets.randbelow(1_000_000) / 1_000_000 * high


# --- the state machine ---------------------------------------------------------------------

# state -> message type -> handler name. Anything else is "unexpected-message".
TRANSITIONS: dict[str, dict[type[Message], str]] = {
    "idle": {},
    "registering": {Registered: "_on_registered", Error: "_on_error", Bye: "_on_bye"},
    "registered": {RekeyPush: "_on_rekey_push", ResyncReply: "_on_resync_reply", Pong: "_on_pong",
                   Ping: "_on_ping", Error: "_on_error", Bye: "_on_bye"},
    "closed": {},
}


class MemberProtocol:
    """One member's control-protocol state across sessions (see the module docstring)."""

    def __init__(
        self,
        requests: list[GroupRequest],
        *,
        ack_jitter: float = 1.0,
        ping_interval: float = 15.0,
        ping_timeout: float = 10.0,
        jitter: Callable[[float], float] = _uniform,
        open_rekey: Callable[..., Any] | None = None,
        ca_pem: bytes | None = None,
    ) -> None:
        if not requests:
            raise LocalProtocolError("a member must request at least one group")
        self.requests = list(requests)
        self.state = "idle"
        self.member_name: str | None = None
        self.levels: dict[Key, LevelState] = {}
        self.verify_keys: list[Ed25519PublicKey] = []
        self._ca = x509.load_pem_x509_certificate(ca_pem) if ca_pem else None  # verifies HA rekey certs
        self.heartbeat_interval: float | None = None
        self.offset = 0.0  # controller time - member time
        self._ack_jitter = ack_jitter
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._jitter = jitter
        self._open_rekey = open_rekey
        self._reassembler: Any = None
        self._out: list[Message] = []
        self._now = float("-inf")  # the latest time seen (timers never point before it)
        self._events: list[Event] = []
        self._emitted: dict[Key, Any] = {}
        self._ping_at: float | None = None
        self._ping_nonce: int | None = None
        self._ping_deadline: float | None = None
        self.counters: dict[str, int] = {"rekeys_applied": 0, "heartbeats": 0, "resyncs_sent": 0,
                                         "acks_sent": 0, "registrations": 0, "datagrams": 0}
        self.rejected: dict[str, int] = {}

    # ---- session lifecycle ------------------------------------------------------------

    def connect(self, now: float) -> None:
        """A new TLS session is up: queue Register (with the message IDs we hold)."""
        if self.state not in ("idle", "closed"):
            raise LocalProtocolError(f"connect() in state {self.state}")
        self.state = "registering"
        self._out.clear()
        known = {f"{g}/{lv}": st.msg_id for (g, lv), st in self.levels.items()}
        self._out.append(Register(PROTOCOL_VERSION, [r.to_wire() for r in self.requests], known or None))
        self._ping_at = self._ping_deadline = self._ping_nonce = None

    def connection_lost(self, now: float) -> None:
        """The session ended. Installed SAs stay: they remain valid until they expire."""
        self.state = "closed"
        self._out.clear()
        self._ping_at = self._ping_deadline = self._ping_nonce = None
        for st in self.levels.values():
            st.resync_sent_at = None
            st.ack_due = None

    # ---- input --------------------------------------------------------------------------

    def receive_message(self, msg: Message, now: float) -> None:
        handler = TRANSITIONS[self.state].get(type(msg))
        if handler is None:
            raise RemoteProtocolError(f"{msg.TYPE!r} is not expected in state {self.state}", "unexpected-message")
        getattr(self, handler)(msg, now)
        self._refresh(now)

    def receive_datagram(self, data: bytes, now: float, source: str = "multicast") -> None:
        """A datagram from the rekey channel (or a RekeyPush's bytes). Never raises for bad input."""
        self.counters["datagrams"] += 1
        if not self.levels:
            self._reject(BadRekey("no group registered yet", "not-registered"), source)
            return
        try:
            opened = self._open(data, now)
        except BadRekey as exc:
            self._reject(exc, source)
            self._refresh(now)
            return
        if opened is not None:
            self._on_rekey_message(opened[0], opened[1], now, source)
        self._refresh(now)

    # ---- output -------------------------------------------------------------------------

    def messages_to_send(self) -> list[Message]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        """The member time at which handle_timer must be called next (None: nothing pending)."""
        times: list[float] = []
        for st in self.levels.values():
            if st.ack_due is not None:
                times.append(st.ack_due)
            if st.resync_sent_at is not None:
                times.append(st.resync_sent_at + RESYNC_RETRY)
            for sa in st.sas.values():
                times.extend(self._sa_times(st, sa))
            if self.heartbeat_interval and st.last_heartbeat is not None and self.state == "registered":
                times.append(st.last_heartbeat + SILENCE * self.heartbeat_interval)
        for t in (self._ping_at, self._ping_deadline):
            if t is not None:
                times.append(t)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._ping_deadline is not None and now >= self._ping_deadline:
            self._ping_deadline = self._ping_at = None
            self._events.append(KeepaliveTimeout())
        elif self._ping_at is not None and now >= self._ping_at and self.state == "registered":
            self._ping_nonce = secrets.randbits(62)
            self._out.append(Ping(self._ping_nonce))
            self._ping_at = None
            self._ping_deadline = now + self._ping_timeout
        for st in self.levels.values():
            if st.ack_due is not None and now >= st.ack_due:
                st.ack_due = None
                if self.state == "registered":  # else the next Register reports our msg_id anyway
                    self._out.append(Ack(st.policy.group, st.policy.level, st.msg_id, st.kek_epoch))
                    self.counters["acks_sent"] += 1
            if st.resync_sent_at is not None and now >= st.resync_sent_at + RESYNC_RETRY:
                st.resync_sent_at = None
                self._request_resync(st, now, "retry")
            if (self.heartbeat_interval and st.last_heartbeat is not None and self.state == "registered"
                    and now >= st.last_heartbeat + SILENCE * self.heartbeat_interval):
                # heartbeats stopped arriving (multicast broken?): ask over TLS
                st.last_heartbeat = now
                self._request_resync(st, now, "heartbeat-missing")
        self._refresh(now)

    # ---- queries ------------------------------------------------------------------------

    def install_for(self, key: Key, now: float) -> DesiredInstall:
        st = self.levels[key]
        inbound, outbound = self._select(st, now)
        return DesiredInstall(st.policy, inbound, outbound, dict(st.sender_keys), dict(st.owners),
                              st.signing_key if st.role == "sender" else None)

    def to_controller_time(self, now: float) -> float:
        return now + self.offset

    def statistics(self, now: float | None = None) -> dict[str, Any]:
        groups = []
        for (g, lv), st in self.levels.items():
            sas = []
            for (spi, _d), sa in sorted(st.sas.items()):
                exp = self._expiry(sa)
                sas.append({"spi": spi, "direction": sa.grant.direction, "sender": self._sender_of(sa.params),
                            "suite": sa.params.suite, "activate_at": sa.grant.activate_at,
                            "expires_in": None if exp is None or now is None else round(exp - now, 3)})
            groups.append({"group": g, "level": lv, "role": st.role, "msg_id": st.msg_id,
                           "kek_epoch": st.kek_epoch, "kek_id": kek_id(st.keks.get(st.kek_epoch, b"")), "sender_id": st.sender_id, "sas": sas,
                           "resync_pending": st.resync_sent_at is not None,
                           "lkh": None if st.lkh is None else {"epoch": st.lkh.epoch, "leaf": st.lkh.leaf_id,
                                                               "keys": len(st.lkh.keys)}})
        return {"state": self.state, "member": self.member_name, "counters": dict(self.counters),
                "rejected": dict(self.rejected), "groups": groups}

    # ---- message handlers ------------------------------------------------------------------

    def _on_registered(self, msg: Registered, now: float) -> None:
        try:
            vk = Ed25519PublicKey.from_public_bytes(msg.rekey_public_key)
        except ValueError:
            raise RemoteProtocolError("rekey public key is not an Ed25519 key", "bad-message") from None
        grants = msg.grant_objects()
        wanted = {r.group for r in self.requests}
        for g in grants:
            if g.policy.group not in wanted:
                raise RemoteProtocolError(f"granted group {g.policy.group!r} was not requested", "bad-message")
        self.verify_keys = [vk, *self._certified_keys(msg)]
        self.offset = msg.server_time - now
        self.heartbeat_interval = msg.heartbeat_interval if msg.heartbeat_interval > 0 else None
        self.member_name = msg.member
        self.state = "registered"
        self.counters["registrations"] += 1
        granted = set()
        for g in grants:
            if not self._stale_grant(g, "register"):
                self._apply_grant(g, now)
            granted.add(g.policy.key)
        for key in [k for k in self.levels if k not in granted]:
            del self.levels[key]  # no longer authorized: forget the level now
            self._emitted.pop(key, None)
            self._events.append(GroupRemoved(key))
        self._ping_at = now + self._ping_interval
        self._events.append(RegisteredEvent(msg.member, tuple(sorted(granted))))

    def _certified_keys(self, msg: Registered) -> list[Ed25519PublicKey]:
        """HA: every controller's rekey key whose CA binding verifies (others are counted, unused)."""
        out: list[Ed25519PublicKey] = []
        if self._ca is None or not isinstance(msg.rekey_certs, list):
            return out
        for der in msg.rekey_certs[:32]:
            try:
                out.append(verify_rekey_cert_untrusted(der, self._ca, msg.server_time)[1])
            except BadRekey as exc:
                self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        return out

    def _on_error(self, msg: Error, now: float) -> None:
        self.state = "closed"
        self._events.append(ControllerError(msg.code, msg.message))

    def _on_bye(self, msg: Bye, now: float) -> None:
        self.state = "closed"
        self._events.append(ControllerError("bye", msg.reason or ""))

    def _on_ping(self, msg: Ping, now: float) -> None:
        self._out.append(Pong(msg.nonce))

    def _on_pong(self, msg: Pong, now: float) -> None:
        if msg.nonce == self._ping_nonce:
            self._ping_nonce = self._ping_deadline = None
            self._ping_at = now + self._ping_interval

    def _on_rekey_push(self, msg: RekeyPush, now: float) -> None:
        self.receive_datagram(msg.datagram, now, "unicast")

    def _on_resync_reply(self, msg: ResyncReply, now: float) -> None:
        grant = Grant.from_wire_untrusted(msg.grant)
        if grant.policy.key not in self.levels:
            raise RemoteProtocolError(f"resync reply for {grant.policy.key} which we do not hold", "bad-message")
        if self._stale_grant(grant, "resync"):
            self.levels[grant.policy.key].resync_sent_at = None  # what we hold is newer: nothing missing
            return
        st = self._apply_grant(grant, now)
        st.resync_sent_at = None
        st.ack_due = now + self._jitter(self._ack_jitter)
        self._events.append(RekeyApplied(st.key, st.msg_id, st.kek_epoch, "grant", "resync"))

    # ---- grants and rekeys -----------------------------------------------------------------

    def _stale_grant(self, g: Grant, source: str) -> bool:
        """A grant older than the state we hold (lower KEK epoch, or the same epoch and a lower
        msg_id) is ignored: a resync reply that crossed a newer multicast rekey, or a grant
        from an HA follower whose copy of the state lags the leader's. Applying it would
        roll the member back (an old KEK, the newest TEK retired after DTD) and make it
        accept the newer msg_id a second time."""
        old = self.levels.get(g.policy.key)
        if old is None or (g.kek_epoch, g.msg_id) >= (old.kek_epoch, old.msg_id):
            return False
        self._reject(BadRekey(f"grant at msg_id {g.msg_id} (KEK epoch {g.kek_epoch}) is older than "
                              f"{old.msg_id} (epoch {old.kek_epoch})", "stale-grant"), source)
        return True

    def _apply_grant(self, g: Grant, now: float) -> LevelState:
        """Replace a level's state with a fresh grant, keeping SAs the grant no longer lists
        until their deactivation delay has passed (so packets in flight still decrypt)."""
        key = g.policy.key
        old = self.levels.get(key)
        keks = {g.kek_epoch: g.kek}
        if old is not None and old.kek_epoch < g.kek_epoch and old.kek_epoch in old.keks:
            keks[old.kek_epoch] = old.keks[old.kek_epoch]
        st = LevelState(policy=g.policy, role=g.role, sender_id=g.sender_id, kek_epoch=g.kek_epoch, keks=keks,
                        msg_id=g.msg_id, sender_keys=dict(g.sender_keys), owners=_owners(g.extra.get("owners")),
                        signing_key=_signing_key(g.extra.get("signing_key")))
        try:
            st.lkh = tree_from_grant(g.extra, g.kek)
        except BadRekey as exc:  # unusable path: the next tree rekey fails to open and we resync
            self._reject(exc, "grant")
        ctl_now = now + self.offset
        if old is not None:
            st.last_heartbeat, st.last_heartbeat_time = old.last_heartbeat, old.last_heartbeat_time
            st.msg_id = max(g.msg_id, old.msg_id) if old.kek_epoch <= g.kek_epoch else g.msg_id
            listed = {(s.params.spi, s.direction) for s in g.sas}
            for skey, sa in old.sas.items():
                if skey in listed or not self._usable_after_regrant(sa, g, ctl_now):
                    continue
                dtd = ctl_now + g.policy.dtd
                deact = sa.grant.deactivate_at
                st.sas[skey] = _SA(dataclasses.replace(sa.grant, deactivate_at=dtd if deact is None else min(deact, dtd)),
                                  sa.installed_at)
        for sg in g.sas:
            skey = (sg.params.spi, sg.direction)
            prev = old.sas.get(skey) if old is not None else None
            st.sas[skey] = _SA(sg, prev.installed_at if prev is not None else now)
        self.levels[key] = st
        return st

    def _usable_after_regrant(self, sa: _SA, g: Grant, ctl_now: float) -> bool:
        if sa.grant.deactivate_at is not None and sa.grant.deactivate_at <= ctl_now:
            return False
        return g.role == "sender" or sa.grant.direction == "in"

    def _open(self, data: bytes, now: float) -> tuple[LevelState, Any] | None:
        """Verify and decrypt a rekey datagram against each level we hold (the header names
        the group; the signature is checked before anything else). Returns (level, message),
        or None while a fragmented message is incomplete."""
        opener = self._open_rekey
        if opener is None:
            from groupsec.protocol import rekey

            opener = self._open_rekey = rekey.open_rekey_untrusted
            if self._reassembler is None:
                self._reassembler = rekey.Reassembler()
        for st in self.levels.values():
            try:
                m = opener(data, self.verify_keys, st.keks, expect_group=st.policy.group,
                           expect_level=st.policy.level)
            except BadRekey as exc:
                if exc.reason == "wrong-group":
                    continue
                if exc.reason == "unknown-kek":
                    self._request_resync(st, now, "unknown-kek")
                raise
            if m.frag is not None:
                if self._reassembler is None:
                    raise BadRekey("fragmented rekey without a reassembler", "bad-format")
                m = self._reassembler.add(m, now)
                if m is None:
                    return None
            return st, m
        raise BadRekey("rekey for a group level we are not in", "wrong-group")

    def _on_rekey_message(self, st: LevelState, m: Any, now: float, source: str) -> None:
        if m.kind == "heartbeat":
            if m.msg_id < st.msg_id or m.time < st.last_heartbeat_time:
                self._reject(BadRekey(f"old heartbeat msg_id {m.msg_id}", "replayed"), source)
                return
            self.counters["heartbeats"] += 1
            st.last_heartbeat, st.last_heartbeat_time = now, m.time
            if m.msg_id > st.msg_id:
                self._request_resync(st, now, "heartbeat-gap")
            return
        if m.msg_id <= st.msg_id:
            self._reject(BadRekey(f"msg_id {m.msg_id} is not above {st.msg_id}", "replayed"), source)
            return
        if m.msg_id > st.msg_id + 1:
            self._request_resync(st, now, "msg-id-gap")
        if has_tree_update(m.extra):
            self._apply_tree(st, m, now, source)
        self._apply_inner(st, m, now)
        st.msg_id = m.msg_id
        st.last_applied_at = now
        st.last_heartbeat = now  # a rekey proves the channel works as much as a heartbeat
        self.counters["rekeys_applied"] += 1
        if self.state == "registered":
            st.ack_due = now + self._jitter(self._ack_jitter)
        self._events.append(RekeyApplied(st.key, m.msg_id, st.kek_epoch, m.kind, source))

    def _apply_inner(self, st: LevelState, m: Any, now: float) -> None:
        gone = set(m.remove)
        for skey in [k for k in st.sas if k[0] in gone]:
            del st.sas[skey]
        for sg in m.sas:
            if sg.params.group and (sg.params.group, sg.params.level) != st.key:
                continue  # an SA labelled for another level never enters this one
            skey = (sg.params.spi, sg.direction)
            prev = st.sas.get(skey)
            if prev is None and len(st.sas) >= MAX_SAS_PER_LEVEL:
                continue
            st.sas[skey] = _SA(sg, prev.installed_at if prev is not None else now)
        if m.new_kek is not None and m.new_kek_epoch is not None:
            epoch, key = m.new_kek_epoch, m.new_kek
            if epoch > st.kek_epoch:
                st.keks[epoch] = key
                st.kek_epoch = epoch
                for e in sorted(st.keks)[:-KEEP_KEKS]:
                    del st.keks[e]
        if "owners" in m.extra:
            st.owners = _owners(m.extra["owners"])
        if m.sender_keys:
            st.sender_keys.update(m.sender_keys)
        for sid in m.revoked_senders:
            st.revoked_senders.add(sid)
            st.sender_keys.pop(sid, None)

    def _apply_tree(self, st: LevelState, m: Any, now: float, source: str) -> None:
        """A key-tree update (before the rest of the payload): derive the new KEK from our path
        keys. A missed tree message or an unusable one: resync; evicted: stop (member_lkh.py)."""
        if st.lkh is None:
            self._request_resync(st, now, "lkh-no-path")
            return
        try:
            new = apply_tree_update(st.lkh, m.extra)
        except BadRekey as exc:
            if exc.reason == "lkh-stale":  # our path (from a grant) is already past it
                return
            self._reject(exc, source)
            if exc.reason == "lkh-cannot-derive":
                self.counters["lkh_evicted"] = self.counters.get("lkh_evicted", 0) + 1
                st.lkh = None  # our keys no longer lead to the KEK: stop using the tree
            self._request_resync(st, now, exc.reason)
            return
        self.counters["lkh_applied"] = self.counters.get("lkh_applied", 0) + 1
        if new is not None and new[0] > st.kek_epoch:
            st.kek_epoch = new[0]
            st.keks[new[0]] = new[1]
            for e in sorted(st.keks)[:-KEEP_KEKS]:
                del st.keks[e]

    def _request_resync(self, st: LevelState, now: float, why: str) -> None:
        if st.resync_sent_at is not None or self.state != "registered":
            return
        st.resync_sent_at = now
        self._out.append(Resync(st.policy.group, st.policy.level, st.msg_id))
        self.counters["resyncs_sent"] += 1
        self._events.append(ResyncRequested(st.key, st.msg_id, why))

    def _reject(self, exc: BadRekey, source: str) -> None:
        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        self._events.append(RekeyRejected(exc.reason, source, str(exc)[:200]))

    # ---- desired data path state -------------------------------------------------------------

    def _sa_times(self, st: LevelState, sa: _SA) -> list[float]:
        out = []
        if st.role == "sender" and self._sendable(st, sa):
            t = sa.grant.activate_at - self.offset
            if t > self._now:
                out.append(t)
        if sa.grant.deactivate_at is not None:
            out.append(sa.grant.deactivate_at - self.offset)
        exp = self._expiry(sa)
        if exp is not None:
            out.append(exp)
        return out

    @staticmethod
    def _expiry(sa: _SA) -> float | None:
        hard = sa.params.lifetime.hard_seconds
        return sa.installed_at + hard if hard else None

    def _select(self, st: LevelState, now: float) -> tuple[tuple[SAParams, ...], SAParams | None]:
        """Inbound: every SA not yet deactivated (new ones at once). Outbound (senders only):
        the candidate with the latest activation time that has been reached. Candidates are
        the SAs that _sendable() accepts (a shared counter-mode SA is sent with our sender ID)."""
        ctl = now + self.offset
        inbound: dict[int, SAParams] = {}
        best: _SA | None = None
        for skey in sorted(st.sas):
            sa = st.sas[skey]
            if self._dead(sa, now, ctl):
                continue
            p = sa.params
            if sa.grant.direction == "in" or self._shared(p):
                inbound.setdefault(p.spi, dataclasses.replace(p, sender_id=None) if p.sender_id is not None else p)
            if (st.role == "sender" and self._sendable(st, sa)
                    and sa.grant.activate_at <= ctl
                    and (best is None or sa.grant.activate_at > best.grant.activate_at)):
                best = sa
        outbound = None
        if best is not None:
            outbound = best.params
            if self._shared(outbound) and st.sender_id is not None:
                outbound = dataclasses.replace(outbound, sender_id=st.sender_id)
            elif self._shared(outbound) and outbound.sender_id is None:
                outbound = None  # a shared counter-mode SA needs our sender ID: never send without it
        return tuple(inbound[spi] for spi in sorted(inbound)), outbound

    def _dead(self, sa: _SA, now: float, ctl: float) -> bool:
        exp = self._expiry(sa)
        return (sa.grant.deactivate_at is not None and sa.grant.deactivate_at <= ctl) or (exp is not None and exp <= now)

    @staticmethod
    def _shared(p: SAParams) -> bool:
        return p.sender_id_bits > 0

    def _sendable(self, st: LevelState, sa: _SA) -> bool:
        """May this sender seal with ``sa``? Grants marked "out", any SA of a level whose
        sender policy is "shared" (one group SA for every sender: counter-mode ones carry our
        sender ID, CBC/HMAC ones need none), and per-sender SAs that the owners map gives us."""
        p = sa.params
        return (sa.grant.direction == "out" or self._shared(p) or st.policy.sender_policy == "shared"
                or (st.sender_id is not None and st.owners.get(p.spi) == st.sender_id))

    @staticmethod
    def _sender_of(p: SAParams) -> str:
        if p.sender_id is not None:
            return f"id {p.sender_id}"
        return p.src or ("shared" if p.sender_id_bits else "any")

    def _refresh(self, now: float) -> None:
        """Drop expired SAs and emit InstallChanged for every level whose desired state moved."""
        self._now = max(self._now, now)
        ctl = now + self.offset
        for key, st in self.levels.items():
            for skey in [k for k, sa in st.sas.items() if self._dead(sa, now, ctl)]:
                del st.sas[skey]
            inst = self.install_for(key, now)
            if self._emitted.get(key) != inst:
                self._emitted[key] = inst
                self._events.append(InstallChanged(inst))
