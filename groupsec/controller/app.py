"""The controller application: ties the group manager, the sessions and rekey delivery
together. Implements the protocol ``Backend``. No sockets here: multicast sending and
session wake-ups are callbacks set by the trio shell (server.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groupsec.controller.config import Config, LevelConfig
from groupsec.controller.etcdstore import NotLeader
from groupsec.controller.groups import GroupManager, Refusal, RekeyPlan
from groupsec.controller.store import Store
from groupsec.protocol.controller import ControllerSession, Refused
from groupsec.protocol.messages import Ack, Grant, Register, Registered
from groupsec.protocol.rekey import build_heartbeat_datagrams, build_rekey_datagrams

log = logging.getLogger("groupsec.controller")


@dataclass(eq=False)
class SessionHandle:
    session: ControllerSession
    wake: Callable[[], None]
    roles: dict[tuple[str, str], set[str]] = field(default_factory=dict)


class ControllerApp:
    def __init__(self, config: Config, store: Store, signing_key: Any, home: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.signing_key = signing_key
        self.public_key = signing_key.public_key().public_bytes_raw()
        self.home = home
        self.clock = clock
        self.manager = GroupManager(config, store)
        self.sessions: dict[str, set[SessionHandle]] = {}
        self.counters: dict[str, int] = {}
        self.acks: dict[str, dict[str, Any]] = {k[4:]: v for k, v in store.scan("ack/")}
        self._dirty_acks: set[str] = set()
        self.multicast: Callable[[LevelConfig, bytes], None] = lambda lc, dg: None
        self.rekey_listeners: list[Callable[[RekeyPlan], None]] = []
        # HA (groupsec.controller.ha): only the leader mints keys, allocates and sends rekeys
        self.is_leader: Callable[[], bool] = lambda: True
        self.rekey_certs: list[bytes] | None = None  # every controller's CA-certified rekey key (DER)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def start(self) -> None:
        now = self.clock()
        self.manager.load_or_create(now)
        # finish evictions recorded while no controller ran, then resend the last rekey of every
        # level unchanged (same msg_id, same keys): a crash mid-rekey resumes where it stopped
        pending = [rec["name"] for _, rec in self.store.scan("member/") if rec.get("revoked") and not rec.get("evicted")]
        if pending:
            self.evict_many(pending)
        for lc in self.config.levels.values():
            plan = self.manager.last_plan(lc)
            tree_plan = self.manager.last_tree_plan(lc)
            if plan is not None and tree_plan is not None and tree_plan.msg_id == plan.msg_id - 1:
                self.send_plan(tree_plan, resend=True)  # a key-tree eviction: its tree message, then the TEKs
            if plan is not None:
                self.send_plan(plan, resend=True)

    # ---- Backend ---------------------------------------------------------------------------

    def register(self, identity: str, serial: int | None, msg: Register, now: float
                 ) -> tuple[Registered, dict[tuple[str, str], set[str]]] | Refused:
        res = self.manager.authorize(identity, serial, msg.requests())
        if isinstance(res, Refusal):
            self.count(f"refused-{res.code}")
            log.warning("registration of %s refused: %s (%s)", identity, res.code, res.message)
            return Refused(res.code, res.message)
        wall = self.clock()
        grants = []
        for key, roles in sorted(res.items()):
            lc = self.config.levels[key]
            try:
                # a new member takes its leaf in the level's key tree (the others may need a tree rekey)
                plans = [self.manager.ensure_tree_member(identity, lc, wall)]
                if "sender" in roles:
                    plans.append(self.manager.ensure_sender(identity, lc, wall))
            except NotLeader as exc:  # a new leaf or sender ID: only the leader allocates one
                self.count("refused-not-leader")
                return Refused("not-leader", str(exc)[:200])
            for plan in plans:
                if plan is not None:
                    self.send_plan(plan)
            g = self.manager.grant(identity, lc, roles)
            grants.append(g.to_wire())
            self._record_ack(identity, key, g.msg_id, g.kek_epoch, wall, "register")
        self.count("registrations")
        return (Registered(identity, grants, self.public_key, wall, self.config.controller.heartbeat_interval,
                           self.rekey_certs), res)

    def resync(self, identity: str, group: str, level: str, now: float) -> Grant | Refused:
        rec = self.manager.member(identity)
        if rec is None or rec.get("revoked"):
            return Refused("revoked", f"{identity} is revoked")
        handle_roles = self._roles_of(identity, (group, level))
        if not handle_roles:
            return Refused("not-authorized", f"{identity} holds no roles in {group}/{level}")
        self.count("resyncs")
        lc = self.config.levels[(group, level)]
        try:
            plan = self.manager.ensure_tree_member(identity, lc, self.clock())  # normally a no-op
        except NotLeader as exc:
            return Refused("not-leader", str(exc)[:200])
        if plan is not None:
            self.send_plan(plan)
        return self.manager.grant(identity, lc, handle_roles)

    def ack(self, identity: str, msg: Ack, now: float) -> None:
        self.count("acks")
        self._record_ack(identity, (msg.group, msg.level), msg.msg_id, msg.kek_epoch, self.clock(), "ack")

    def _record_ack(self, name: str, key: tuple[str, str], msg_id: int, epoch: int, t: float, how: str) -> None:
        rec = self.acks.setdefault(name, {})
        rec[f"{key[0]}/{key[1]}"] = {"msg_id": msg_id, "kek_epoch": epoch, "time": t, "how": how}
        self._dirty_acks.add(name)

    def flush_acks(self) -> None:
        if self._dirty_acks:
            self.store.commit({f"ack/{n}": self.acks[n] for n in self._dirty_acks})
            self._dirty_acks.clear()

    def _roles_of(self, name: str, key: tuple[str, str]) -> set[str]:
        for h in self.sessions.get(name, ()):
            if key in h.roles:
                return h.roles[key]
        return set()

    # ---- sessions --------------------------------------------------------------------------

    def add_session(self, h: SessionHandle) -> None:
        self.sessions.setdefault(h.session.identity, set()).add(h)

    def remove_session(self, h: SessionHandle) -> None:
        s = self.sessions.get(h.session.identity)
        if s is not None:
            s.discard(h)
            if not s:
                del self.sessions[h.session.identity]

    def level_handles(self, key: tuple[str, str]) -> list[SessionHandle]:
        return [h for hs in self.sessions.values() for h in hs if key in h.session.levels]

    # ---- rekey delivery --------------------------------------------------------------------

    def send_plan(self, plan: RekeyPlan, resend: bool = False) -> int:
        """Sign and send one durable rekey: multicast, then the same bytes to every session."""
        lc = self.config.levels.get((plan.group, plan.level))
        if lc is None:
            return 0
        kek = self.manager.kek(lc, plan.kek_epoch)
        if kek is None:
            log.warning("%s/%s: rekey %d under a KEK no longer held, not resent", plan.group, plan.level,
                        plan.msg_id)
            return 0
        dgs = build_rekey_datagrams(self.signing_key, plan.kek_epoch, kek, plan.group, plan.level, plan.msg_id,
                                    plan.kind, plan.inner, self.clock())
        for dg in dgs:
            self.multicast(lc, dg)
        n = 0
        for h in self.level_handles(lc.key):
            for dg in dgs:
                h.session.push_rekey(dg)
            if plan.push_grants and "sender" in h.roles.get(lc.key, ()):
                h.session.push_grant(self.manager.grant(h.session.identity, lc, h.roles[lc.key]))
            h.wake()
            n += 1
        self.count("rekeys-resent" if resend else "rekeys-sent")
        self.count(f"rekeys-kind-{plan.kind}")  # metrics: groupsec_controller_rekeys_sent_total{kind}
        for cb in self.rekey_listeners:
            cb(plan)
        return n

    def heartbeat(self, lc: LevelConfig) -> None:
        st = self.manager.state(lc.group, lc.level)
        epoch = st["kek_epoch"]
        for dg in build_heartbeat_datagrams(self.signing_key, epoch, st["keks"][epoch], lc.group, lc.level,
                                            st["msg_id"], self.clock()):
            self.multicast(lc, dg)
        self.count("heartbeats")

    def rekey_now(self, group: str, level: str | None = None, kek: bool = False) -> list[RekeyPlan]:
        lcs = [lc for lc in self.config.group_levels(group) if level is None or lc.level == level]
        plans = [self.manager.rollover(lc, self.clock(), new_kek_inline=kek, reason="operator") for lc in lcs]
        for p in plans:
            self.send_plan(p)
        return plans

    def revoke(self, name: str) -> int:
        """Record the revocation (if the CLI has not already) and evict the member at once."""
        return self.revoke_many([name])

    def revoke_many(self, names: list[str]) -> int:
        """Revoke several members in one operation: on key-tree levels ONE tree rekey evicts
        them all (batch eviction). Unknown names are ignored. Returns the levels rekeyed."""
        known = []
        puts: dict[str, Any] = {}
        for name in dict.fromkeys(names):
            rec = self.manager.member(name)
            if rec is None:
                continue
            known.append(name)
            if not rec.get("revoked"):
                rec["revoked"] = True
                puts.update({f"member/{name}": rec, **{f"revoked/{s}": {"name": name} for s in rec.get("serials", [])}})
        if puts:
            self.store.commit(puts)
        return self.evict_many(known) if known else 0

    def evict(self, name: str, levels: set[tuple[str, str]] | None = None) -> int:
        return self.evict_many([name], levels)

    def evict_many(self, names: list[str], levels: set[tuple[str, str]] | None = None) -> int:
        """Close the members' sessions and rekey their levels without them. ``levels``: only
        those (a downgrade). Flat levels: a fresh KEK is pushed to every remaining member over
        TLS, then the new TEKs follow under it. Key-tree levels: one multicast tree rekey
        (under the old KEK; the same datagrams go to every open session as the redundant path),
        then the new TEKs under the new KEK: no per-member message."""
        gone = set(names)
        if levels is None:
            for name in names:
                for h in list(self.sessions.get(name, ())):
                    h.session.close_with("revoked", f"{name} was revoked")
                    h.wake()
        results = self.manager.evict_many(list(names), self.clock(), levels)
        pushed: set[tuple[str, str]] = set()
        for lc, plan in results:
            for h in self.level_handles(lc.key):
                if h.session.identity in gone:
                    h.session.levels.discard(lc.key)
            if lc.key_tree != "lkh" and lc.key not in pushed:
                pushed.add(lc.key)
                for h in self.level_handles(lc.key):
                    h.session.push_grant(self.manager.grant(h.session.identity, lc, h.roles[lc.key]))
                    h.wake()
                    self.count("kek-grant-pushes")
            self.send_plan(plan)
        if levels is None:
            recs = {n: self.manager.member(n) for n in names}
            done = {f"member/{n}": {**rec, "evicted": True} for n, rec in recs.items() if rec is not None}
            if done:
                self.store.commit(done)
        self.count("evictions", len(names))
        nlevels = len({lc.key for lc, _ in results})
        log.info("evicted %s from %d level(s)", ", ".join(names), nlevels)
        return nlevels

    def reload_member(self, name: str, lost: list[list[str]] | None = None) -> int:
        """A member record changed (``groupsec member set``): levels it lost are rekeyed for
        the members that remain; it keeps its other levels."""
        levels = {(str(g), str(lv)) for g, lv in lost or []} & set(self.config.levels)
        return self.evict(name, levels) if levels else 0

    # ---- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        levels = self.manager.summary()
        current = {(lv["group"], lv["level"]): lv for lv in levels}
        members = []
        for _, rec in self.store.scan("member/"):
            name = rec["name"]
            acks = self.acks.get(name, {})
            per = []
            for g, _role, lvl in rec.get("groups", []):
                for lc in self.config.group_levels(g):
                    if lvl and lc.level != lvl:
                        continue
                    a = acks.get(f"{lc.group}/{lc.level}")
                    cur = current[lc.key]
                    per.append({"group": lc.group, "level": lc.level, "epoch": a["kek_epoch"] if a else None,
                                "msg_id": a["msg_id"] if a else None, "last_ack": a["time"] if a else None,
                                "lagging": bool(not rec.get("revoked") and (
                                    a is None or a["msg_id"] < cur["msg_id"] or a["kek_epoch"] < cur["kek_epoch"]))})
            uniq = {(p["group"], p["level"]): p for p in per}
            members.append({"name": name, "revoked": bool(rec.get("revoked")), "connected": len(self.sessions.get(name, ())),
                            "levels": list(uniq.values())})
        return {"levels": levels, "members": members, "counters": dict(self.counters),
                "sessions": sum(len(s) for s in self.sessions.values())}
