"""The group manager: members, authorization, TEK generations, KEKs, sender IDs, SPIs.

All durable state goes through a ``Store`` (one ``commit`` per state change, written
BEFORE anything that uses it leaves the controller). Time is passed in as ``now``
(controller wall clock, the clock of SAGrant.activate_at). No sockets, no trio here.

Per group level the state is::

    {"kek_epoch": int, "keks": {epoch: key} (current and previous), "kek_created": t,
     "msg_id": int, "next_gen": int,
     "gens": [{"gen", "activate_at", "deactivate_at", "created", "group_sa": SAParams-dict | None,
               "sender_sas": {member: SAParams-dict}}],            # oldest first
     "sender_ids": {member: id}, "revoked_senders": [id],
     "lkh_base": int}                      # key-tree levels only (groupsec.controller.keytree)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from groupsec.controller.config import Config, LevelConfig
from groupsec.controller.keytree import KeyTrees, adopt_root, lkh_inner
from groupsec.controller.store import Store
from groupsec.errors import ConfigError
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sourceauth import generate_signing_key, public_key_bytes, source_auth_refusal
from groupsec.keys.tek import new_kek, new_sa, random_spi
from groupsec.protocol.messages import Grant, GroupRequest, SAGrant

log = logging.getLogger("groupsec.controller.groups")

ROLES = ("sender", "receiver")
SA_LIFETIME_MARGIN = 60.0


@dataclass(frozen=True)
class Refusal:
    code: str  # an ERROR_CODES entry
    message: str


@dataclass
class RekeyPlan:
    """A rekey message to send (already durable): the caller signs, multicasts and pushes it."""

    group: str
    level: str
    msg_id: int
    kek_epoch: int
    kind: str
    inner: dict[str, Any] = field(repr=False)
    time: float = 0.0
    push_grants: bool = False  # also push a fresh Grant to every connected member (per-sender owners)


def parse_group_spec(spec: str) -> tuple[str, str, str]:
    """``G:sender|receiver[:level]`` -> (group, role, level)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or parts[1] not in ROLES:
        raise ConfigError(f"--group {spec!r}: expected GROUP:sender|receiver[:LEVEL]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def _lkey(group: str, level: str) -> str:
    return f"level/{group}/{level}"


class GroupManager:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.levels: dict[tuple[str, str], dict[str, Any]] = {}
        self._spis: dict[str, set[int]] = {}
        for k, _ in store.scan("spi/"):
            _, dst, spi = k.split("/", 2)
            self._spis.setdefault(dst, set()).add(int(spi, 16))
        self.counters: dict[str, int] = {}
        self.trees = KeyTrees(store)

    # ---- members ---------------------------------------------------------------------------

    def member(self, name: str) -> dict[str, Any] | None:
        return self.store.get(f"member/{name}")

    def is_revoked_serial(self, serial: int) -> bool:
        return self.store.get(f"revoked/{serial:X}") is not None

    def level_members(self, lc: LevelConfig) -> list[str]:
        """Names authorized for the level (registry grants, filtered by the level allow-list)."""
        out = []
        for _, rec in self.store.scan("member/"):
            if rec.get("revoked"):
                continue
            if self._roles_in(rec, lc) and (lc.members is None or rec["name"] in lc.members):
                out.append(rec["name"])
        return out

    @staticmethod
    def _roles_in(rec: dict[str, Any], lc: LevelConfig) -> set[str]:
        return {role for g, role, lv in rec.get("groups", []) if g == lc.group and lv in ("", lc.level)}

    def check_member_groups(self, groups: list[tuple[str, str, str]], xfrm: bool) -> None:
        """Refuse a registry entry naming an unknown group/level or an impossible combination."""
        for g, role, lv in groups:
            lvls = self.config.group_levels(g)
            if not lvls:
                raise ConfigError(f"--group {g}: unknown group (configured: {', '.join(self.config.groups) or 'none'})")
            if lv and (g, lv) not in self.config.levels:
                names = ", ".join(x.level for x in lvls if x.level) or "none"
                raise ConfigError(f"--group {g}:{role}:{lv}: unknown level (levels of {g}: {names})")
            for lc in lvls if not lv else [self.config.levels[(g, lv)]]:
                why = source_auth_refusal(lc.policy.source_auth, "xfrm") if xfrm else None
                if why:
                    raise ConfigError(f"--group {g}:{role}: {why}")
                if xfrm and role == "sender" and lc.shared_sender_ids:
                    raise ConfigError(f"--group {g}:{role}: an XFRM sender cannot use the shared counter-mode SA of "
                                      f"{g} (Linux cannot put a sender ID in the IV): set sender_policy = "
                                      "\"per-sender\" for this group")

    # ---- authorization ---------------------------------------------------------------------

    def authorize(self, name: str, serial: int | None, requests: list[GroupRequest]
                  ) -> dict[tuple[str, str], set[str]] | Refusal:
        """The intersection of what the member asks and what the registry allows:
        {(group, level): {roles}}, or a Refusal."""
        rec = self.member(name)
        if rec is None:
            return Refusal("not-authorized", f"{name} is not a registered member")
        if rec.get("revoked") or (serial is not None and self.is_revoked_serial(serial)):
            return Refusal("revoked", f"the certificate of {name} is revoked")
        if not requests:
            return Refusal("bad-message", "register names no group")
        out: dict[tuple[str, str], set[str]] = {}
        why = ""
        for req in requests:
            lvls = self.config.group_levels(req.group)
            if not lvls:
                return Refusal("unknown-group", f"group {req.group!r} is not configured"[:200])
            if req.level:
                if (req.group, req.level) not in self.config.levels:
                    return Refusal("unknown-group", f"group {req.group!r} has no level {req.level!r}"[:200])
                lvls = [self.config.levels[(req.group, req.level)]]
            for lc in lvls:
                if req.role not in self._roles_in(rec, lc) or (lc.members is not None and name not in lc.members):
                    why = f"{name} is not authorized as {req.role} of {lc.group}/{lc.level or '-'}"
                    continue
                refusal = source_auth_refusal(lc.policy.source_auth, rec.get("datapath") or "any")
                if refusal:
                    why = f"{lc.group}: {refusal}"
                    continue
                if req.role == "sender" and rec.get("datapath") == "xfrm" and lc.shared_sender_ids:
                    why = f"{lc.group}: XFRM senders need per-sender SAs (no sender ID in the kernel's IV)"
                    continue
                out.setdefault(lc.key, set()).add(req.role)
        if not out:
            return Refusal("not-authorized", why[:200])
        return out

    # ---- level state -----------------------------------------------------------------------

    def state(self, group: str, level: str) -> dict[str, Any]:
        key = (group, level)
        st = self.levels.get(key)
        if st is None:
            st = self.store.get(_lkey(group, level))
            self.trees.forget_key(key)  # the tree changes only with its level state: reload both
            if st is not None:
                st["keks"] = {int(k): v for k, v in st["keks"].items()}
                self.levels[key] = st
        if st is None:
            raise KeyError(key)
        return st

    def _alloc_spi(self, dst: str, reserve: set[int]) -> int:
        taken = self._spis.setdefault(dst, set())
        spi = random_spi(lambda s: s in taken or s in reserve)
        reserve.add(spi)
        return spi

    def _commit(self, lc: LevelConfig, st: dict[str, Any], new_spis: set[int], extra: dict[str, Any] | None = None
                ) -> None:
        dst = lc.policy.dst
        spi_keys = {f"spi/{dst}/{s:08x}": {"group": lc.group, "level": lc.level} for s in new_spis}
        puts = {_lkey(lc.group, lc.level): st, **spi_keys, **(extra or {})}
        if not self.store.commit(puts, (), list(spi_keys)):  # positional: Store implementations name it differently
            raise RuntimeError("SPI collision in the store (another controller writing?)")
        self._spis.setdefault(dst, set()).update(new_spis)
        self.levels[lc.key] = st

    def _hard(self, lc: LevelConfig) -> float:
        p = lc.policy
        return p.tek_lifetime + p.atd + p.dtd + SA_LIFETIME_MARGIN

    def _new_gen(self, lc: LevelConfig, st: dict[str, Any], activate_at: float, now: float,
                 spis: set[int]) -> dict[str, Any]:
        gen: dict[str, Any] = {"gen": st["next_gen"], "activate_at": activate_at, "deactivate_at": None,
                               "created": now, "group_sa": None, "sender_sas": {}}
        st["next_gen"] += 1
        if lc.policy.sender_policy == "shared":
            gen["group_sa"] = new_sa(lc.policy, self._alloc_spi(lc.policy.dst, spis), lc.sender_id_bits,
                                     self._hard(lc)).to_dict()
        else:
            for name in sorted(st["sender_ids"]):
                gen["sender_sas"][name] = new_sa(lc.policy, self._alloc_spi(lc.policy.dst, spis), 0,
                                                 self._hard(lc)).to_dict()
        return gen

    def load_or_create(self, now: float) -> None:
        """Make sure every configured level has durable state (KEK epoch 1, generation 0)."""
        for lc in self.config.levels.values():
            try:
                self.state(lc.group, lc.level)
                continue
            except KeyError:
                pass
            st: dict[str, Any] = {"kek_epoch": 1, "keks": {1: new_kek()}, "kek_created": now, "msg_id": 0,
                                  "next_gen": 0, "gens": [], "sender_ids": {}, "revoked_senders": []}
            spis: set[int] = set()
            st["gens"].append(self._new_gen(lc, st, now, now, spis))
            self._commit(lc, st, spis)
            log.info("created state for %s/%s", lc.group, lc.level or "-")
        for lc in self.config.levels.values():
            if lc.key_tree == "lkh" and self.trees.get(lc) is None:
                st = _copy(self.state(lc.group, lc.level))
                self._commit(lc, st, set(), self.trees.create(lc, st, now))
                log.info("%s/%s: LKH key tree created (degree %d), KEK epoch %d", lc.group, lc.level or "-",
                         lc.key_tree_degree, st["kek_epoch"])

    # ---- key trees -------------------------------------------------------------------------

    def ensure_tree_member(self, name: str, lc: LevelConfig, now: float) -> RekeyPlan | None:
        """Give the member its leaf in the level's key tree (once, durably). Returns the tree
        rekey the other members need (a leaf split, or backward access control), if any."""
        st = self.state(lc.group, lc.level)  # first: a reload from the store also reloads the tree
        tree = self.trees.get(lc)
        if tree is None or name in tree:
            return None
        st = _copy(st)
        old_epoch = st["kek_epoch"]
        try:
            res = tree.join(name)
            plan = None
            extra = self.trees.puts(lc, tree)
            if res.rekey is not None:
                adopt_root(st, tree, now)
                st["msg_id"] += 1
                plan = RekeyPlan(lc.group, lc.level, st["msg_id"], old_epoch, "lkh", lkh_inner(st, res.rekey), now)
                extra[f"rekey/{lc.group}/{lc.level}"] = _plan_record(plan)
            self._commit(lc, st, set(), extra)
        except BaseException:
            self.trees.forget(lc)
            raise
        self._count("lkh-joins")
        return plan

    def tree_path(self, name: str, lc: LevelConfig) -> bytes | None:
        tree = self.trees.get(lc)
        return tree.path_for(name).encode() if tree is not None and name in tree else None

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # ---- grants ----------------------------------------------------------------------------

    def ensure_sender(self, name: str, lc: LevelConfig, now: float) -> RekeyPlan | None:
        """Allocate the member's sender ID (and, per-sender policy, its SAs) once, durably.
        Returns a rekey telling receivers about the new sender's SAs (per-sender policy)."""
        st = self.state(lc.group, lc.level)
        if name in st["sender_ids"]:
            return None
        used = set(st["sender_ids"].values()) | set(st["revoked_senders"])
        limit = (1 << lc.sender_id_bits) if lc.sender_id_bits else 1 << 16
        free = next((i for i in range(1, limit) if i not in used), None)
        if free is None:
            raise ConfigError(f"{lc.group}/{lc.level or '-'}: no free sender ID ({lc.sender_id_bits} bits)")
        st = _copy(st)
        st["sender_ids"][name] = free
        if lc.policy.source_auth != "none":  # the sender's Ed25519 source-auth key (docs/SOURCE_AUTH.md s7)
            sk = generate_signing_key()
            st.setdefault("signing_keys", {})[name] = [sk.private_bytes_raw(), public_key_bytes(sk)]
        spis: set[int] = set()
        new: list[dict[str, Any]] = []
        if lc.policy.sender_policy == "per-sender":
            for gen in st["gens"]:
                sa = new_sa(lc.policy, self._alloc_spi(lc.policy.dst, spis), 0, self._hard(lc)).to_dict()
                gen["sender_sas"][name] = sa
                new.append(SAGrant(SAParams.from_dict(sa), "in", gen["activate_at"], gen["deactivate_at"]).to_wire())
        plan = None
        extra = None
        if new or lc.policy.source_auth != "none":
            st["msg_id"] += 1
            inner: dict[str, Any] = {"sas": new}
            if new:
                inner["owners"] = self._owners(st)
            if lc.policy.source_auth != "none":
                inner["sender_keys"] = self._sender_keys(st)
            plan = RekeyPlan(lc.group, lc.level, st["msg_id"], st["kek_epoch"], "rekey", inner, now)
            extra = {f"rekey/{lc.group}/{lc.level}": _plan_record(plan)}
        self._commit(lc, st, spis, extra)
        return plan

    @staticmethod
    def _owners(st: dict[str, Any]) -> list[list[int]]:
        """[[spi, sender_id], ...]: which per-sender SA belongs to which sender (a list, since
        control-protocol maps have string keys only)."""
        return sorted([SAParams.from_dict(sa).spi, st["sender_ids"][n]]
                      for gen in st["gens"] for n, sa in gen["sender_sas"].items() if n in st["sender_ids"])

    @staticmethod
    def _sender_keys(st: dict[str, Any]) -> dict[int, bytes]:
        """Source auth: sender ID -> Ed25519 public key of every current sender."""
        return {st["sender_ids"][n]: pair[1] for n, pair in sorted((st.get("signing_keys") or {}).items())
                if n in st["sender_ids"]}

    def grant(self, name: str, lc: LevelConfig, roles: set[str]) -> Grant:
        st = self.state(lc.group, lc.level)
        sender = "sender" in roles
        sender_id = st["sender_ids"].get(name) if sender else None
        sas: list[SAGrant] = []
        for gen in st["gens"]:
            at, until = gen["activate_at"], gen["deactivate_at"]
            if gen["group_sa"] is not None:
                p = SAParams.from_dict(gen["group_sa"])
                if "receiver" in roles:
                    sas.append(SAGrant(p, "in", at, until))
                if sender:
                    out = dataclasses.replace(p, sender_id=sender_id) if p.sender_id_bits else p
                    sas.append(SAGrant(out, "out", at, until))
            for owner, d in sorted(gen["sender_sas"].items()):
                p = SAParams.from_dict(d)
                if "receiver" in roles:
                    sas.append(SAGrant(p, "in", at, until))
                if sender and owner == name:
                    sas.append(SAGrant(p, "out", at, until))
        epoch = st["kek_epoch"]
        extra: dict[str, Any] = {}
        if lc.policy.sender_policy == "per-sender":
            extra["owners"] = self._owners(st)
        path = self.tree_path(name, lc)
        if path is not None:
            extra["lkh_path"] = path  # MemberPath.encode(): this member's keys, only over its own session
        sender_keys: dict[int, bytes] = {}
        if lc.policy.source_auth != "none":
            if "receiver" in roles:
                sender_keys = self._sender_keys(st)
            pair = (st.get("signing_keys") or {}).get(name) if sender else None
            if pair is not None:
                extra["signing_key"] = pair[0]  # this sender's private key: only over its own TLS session
        return Grant(policy=lc.policy, role="sender" if sender else "receiver", sas=tuple(sas), kek_epoch=epoch,
                     kek=st["keks"][epoch], msg_id=st["msg_id"], sender_id=sender_id, sender_keys=sender_keys,
                     extra=extra)

    # ---- rekeys ----------------------------------------------------------------------------

    def next_rollover_at(self, lc: LevelConfig) -> float:
        st = self.state(lc.group, lc.level)
        latest = st["gens"][-1]
        return float(latest["activate_at"] + lc.policy.tek_lifetime - lc.policy.atd - lc.policy.dtd)

    def next_kek_rollover_at(self, lc: LevelConfig) -> float:
        return float(self.state(lc.group, lc.level)["kek_created"] + lc.policy.kek_lifetime)

    def rollover(self, lc: LevelConfig, now: float, *, new_kek_inline: bool = False, reason: str = "scheduled"
                 ) -> RekeyPlan:
        """TEK rollover: a new generation activating at now+ATD; the previous one is deactivated
        DTD after that. With ``new_kek_inline`` the next KEK travels inside (scheduled KEK rollover;
        on a key-tree level: a new root key, wrapped under the root's children)."""
        st = _copy(self.state(lc.group, lc.level))
        spis: set[int] = set()
        extra: dict[str, Any] = {}
        try:
            plan = self._rollover_into(lc, st, now, spis, extra, new_kek_inline)
            self._commit(lc, st, spis, extra)
        except BaseException:
            self.trees.forget(lc)
            raise
        self._count(f"rollover-{reason}")
        log.info("%s/%s: TEK rollover (%s) msg_id %d gen %d", lc.group, lc.level or "-", reason, plan.msg_id,
                 st["gens"][-1]["gen"])
        return plan

    def _rollover_into(self, lc: LevelConfig, st: dict[str, Any], now: float, spis: set[int],
                       extra: dict[str, Any], new_kek_inline: bool = False) -> RekeyPlan:
        """Apply a TEK rollover to ``st`` (not committed); ``extra`` collects the other puts."""
        self._prune(st, now)
        activate_at = now + lc.policy.atd
        for gen in st["gens"]:
            if gen["deactivate_at"] is None or gen["deactivate_at"] > activate_at + lc.policy.dtd:
                gen["deactivate_at"] = activate_at + lc.policy.dtd
        gen = self._new_gen(lc, st, activate_at, now, spis)
        st["gens"].append(gen)
        st["msg_id"] += 1
        epoch = st["kek_epoch"]  # the datagram is encrypted under the current KEK
        inner: dict[str, Any] = {"sas": self._gen_grants(st), "revoked_senders": list(st["revoked_senders"])}
        if lc.policy.sender_policy == "per-sender":
            inner["owners"] = self._owners(st)
        if lc.policy.source_auth != "none":
            inner["sender_keys"] = self._sender_keys(st)
        kind = "rekey"
        tree = self.trees.get(lc)
        if new_kek_inline and tree is not None:
            msg = tree.refresh_kek()
            adopt_root(st, tree, now)
            inner.update(lkh_inner(st, msg))
            extra.update(self.trees.puts(lc, tree))
            kind = "lkh"
        elif new_kek_inline:
            st["kek_epoch"] = epoch + 1
            st["keks"] = {epoch: st["keks"][epoch], epoch + 1: new_kek()}
            st["kek_created"] = now
            inner["kek"] = {"epoch": epoch + 1, "key": st["keks"][epoch + 1]}
        plan = RekeyPlan(lc.group, lc.level, st["msg_id"], epoch, kind, inner, now,
                         push_grants=lc.policy.sender_policy == "per-sender")
        extra[f"rekey/{lc.group}/{lc.level}"] = _plan_record(plan)
        return plan

    def _gen_grants(self, st: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for gen in st["gens"]:
            sas = [gen["group_sa"]] if gen["group_sa"] is not None else []
            sas += [gen["sender_sas"][n] for n in sorted(gen["sender_sas"])]
            for d in sas:
                out.append(SAGrant(SAParams.from_dict(d), "in", gen["activate_at"], gen["deactivate_at"]).to_wire())
        return out

    def _prune(self, st: dict[str, Any], now: float) -> None:
        st["gens"] = [g for g in st["gens"] if g["deactivate_at"] is None or g["deactivate_at"] > now]

    def evict(self, name: str, now: float, levels: set[tuple[str, str]] | None = None
              ) -> list[tuple[LevelConfig, RekeyPlan]]:
        return self.evict_many([name], now, levels)

    def evict_many(self, names: list[str], now: float, levels: set[tuple[str, str]] | None = None
                   ) -> list[tuple[LevelConfig, RekeyPlan]]:
        """Remove ``names`` (one or a batch) from every level they belonged to (``levels``: only
        those). Returns the rekeys to send, in order, per level:

        - flat level: a fresh KEK epoch is written durably (never sent under the old KEK: the
          caller pushes it per member over TLS), then one TEK rollover under the new KEK;
        - key-tree level: ONE tree message evicting all of them at once (kind "lkh", under the
          old KEK: only the remaining members can open its wraps), then the TEK rollover under
          the new KEK, both written in one commit with the tree.
        """
        out: list[tuple[LevelConfig, RekeyPlan]] = []
        flat: list[LevelConfig] = []
        for lc in self.config.levels.values():
            if levels is not None and lc.key not in levels:
                continue
            st = self.state(lc.group, lc.level)
            tree = self.trees.get(lc)
            if tree is not None:
                gone = [n for n in names if n in tree]
                if gone or any(n in st["sender_ids"] for n in names):
                    out.extend((lc, p) for p in self._evict_tree(lc, tree, gone, names, now))
                continue
            if levels is None and not any(n in st["sender_ids"] or self._was_member(n, lc) for n in names):
                continue
            st = _copy(st)
            self._drop_senders(st, names)
            epoch = st["kek_epoch"] + 1
            st["kek_epoch"], st["keks"], st["kek_created"] = epoch, {epoch: new_kek()}, now
            self._commit(lc, st, set())
            log.info("%s/%s: evicted %s, KEK epoch %d", lc.group, lc.level or "-", ", ".join(names), epoch)
            flat.append(lc)
        return out + [(lc, self.rollover(lc, now, reason="eviction")) for lc in flat]

    def _evict_tree(self, lc: LevelConfig, tree: Any, gone: list[str], names: list[str], now: float
                    ) -> list[RekeyPlan]:
        st = _copy(self.state(lc.group, lc.level))
        self._drop_senders(st, names)
        plans = []
        spis: set[int] = set()
        extra: dict[str, Any] = {}
        try:
            if gone:
                old_epoch = st["kek_epoch"]
                msg = tree.evict(gone)
                adopt_root(st, tree, now)
                st["msg_id"] += 1
                plans.append(RekeyPlan(lc.group, lc.level, st["msg_id"], old_epoch, "lkh", lkh_inner(st, msg), now))
                extra.update(self.trees.puts(lc, tree))
                extra[f"lkhrekey/{lc.group}/{lc.level}"] = _plan_record(plans[0])
            plans.append(self._rollover_into(lc, st, now, spis, extra))
            self._commit(lc, st, spis, extra)
        except BaseException:
            self.trees.forget(lc)
            raise
        self._count("lkh-evictions")
        self._count("rollover-eviction")
        log.info("%s/%s: evicted %s from the key tree (%d wraps), KEK epoch %d", lc.group, lc.level or "-",
                 ", ".join(gone) or "-", len(msg.wraps) if gone else 0, st["kek_epoch"])
        return plans

    @staticmethod
    def _drop_senders(st: dict[str, Any], names: list[str]) -> None:
        for name in names:
            sid = st["sender_ids"].pop(name, None)
            if sid is not None:
                st["revoked_senders"].append(sid)
            (st.get("signing_keys") or {}).pop(name, None)
            for gen in st["gens"]:
                gen["sender_sas"].pop(name, None)

    def last_tree_plan(self, lc: LevelConfig) -> RekeyPlan | None:
        """The tree message of the last key-tree eviction (resent before the rollover after it)."""
        return self._plan_at(f"lkhrekey/{lc.group}/{lc.level}")

    def _was_member(self, name: str, lc: LevelConfig) -> bool:
        rec = self.member(name)
        return rec is not None and bool(self._roles_in(rec, lc))

    def last_plan(self, lc: LevelConfig) -> RekeyPlan | None:
        return self._plan_at(f"rekey/{lc.group}/{lc.level}")

    def _plan_at(self, key: str) -> RekeyPlan | None:
        rec = self.store.get(key)
        if rec is None:
            return None
        return RekeyPlan(rec["group"], rec["level"], rec["msg_id"], rec["kek_epoch"], rec["kind"], rec["inner"],
                         rec["time"], rec.get("push_grants", False))

    def kek(self, lc: LevelConfig, epoch: int) -> bytes | None:
        return self.state(lc.group, lc.level)["keks"].get(epoch)

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for lc in self.config.levels.values():
            try:
                st = self.state(lc.group, lc.level)
            except KeyError:  # configured, but no controller has created its keys yet
                out.append({"group": lc.group, "level": lc.level, "msg_id": 0, "kek_epoch": 0, "generations": [],
                            "senders": 0, "created": False})
                continue
            out.append({"group": lc.group, "level": lc.level, "msg_id": st["msg_id"], "kek_epoch": st["kek_epoch"],
                        "generations": [{"gen": g["gen"], "activate_at": g["activate_at"],
                                         "deactivate_at": g["deactivate_at"],
                                         "spis": [SAParams.from_dict(d).spi for d in
                                                  ([g["group_sa"]] if g["group_sa"] else [])
                                                  + list(g["sender_sas"].values())]} for g in st["gens"]],
                        "senders": len(st["sender_ids"])})
        return out


def _plan_record(plan: RekeyPlan) -> dict[str, Any]:
    return {"group": plan.group, "level": plan.level, "msg_id": plan.msg_id, "kek_epoch": plan.kek_epoch,
            "kind": plan.kind, "inner": plan.inner, "time": plan.time, "push_grants": plan.push_grants}


def _copy(st: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of level state (plain types), so a failed commit leaves memory unchanged."""
    import copy

    return copy.deepcopy(st)
