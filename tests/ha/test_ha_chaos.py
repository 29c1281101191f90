"""Issue 10 acceptance, "no split-brain": 50 random SIGKILLs (then restarts) and SIGSTOPs
(longer than the lease TTL, then SIGCONT) of three `groupsec serve` processes on a real 3-node
etcd cluster, with operator rekeys (TEK and KEK) and evictions (`groupsec member revoke` of
spare members) in between, and scheduled TEK rollovers running throughout.

After every step the test waits until every member holds the level's current msg_id and KEK
(as committed in etcd), then checks, over everything seen so far:
  * one KEK per epoch: members' KEK fingerprints (status.json ``kek_id``, never the key) and
    the committed KEKs agree for every epoch;
  * message IDs never repeat: every msg_id any member applied (status.json ``applied``: the
    KEK and newest TEK it left the member holding) maps to one message only, and the
    committed msg_id never goes backwards;
  * SPIs are never reused: no SPI allocation in etcd is ever created twice, every SA a member
    holds was allocated in etcd, and one SPI never names two different keys;
  * an evicted spare never obtains a KEK minted after its eviction.

The seed is printed (default DEFAULT_SEED; GROUPSEC_CHAOS_SEED=N replays N, =random draws one) so a failure replays the
same sequence of faults; GROUPSEC_CHAOS_STEPS changes the number of steps (default 50).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import Agent, GroupDef, wait_for
from ha_helpers import HAControllers, level_state

from groupsec.controller.etcd import EtcdClient
from groupsec.controller.etcdstore import DATA
from groupsec.protocol.member import kek_id

DEFAULT_SEED = 2843736107  # passed 50 steps; a new run of it still varies in timing
TTL = 2
STEPS = int(os.environ.get("GROUPSEC_CHAOS_STEPS", "50"))
SPARES = 3  # spare receivers running at any time; each eviction replaces the one it removed


class Chaos:
    def __init__(self, tmp: Path, cluster: Any, seed: int) -> None:
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.group = GroupDef("video", extra={"tek_lifetime": 5.0, "atd": 0.3, "dtd": 0.5})
        wipe = EtcdClient(cluster.endpoints)  # the cluster is shared by the module: start from nothing
        wipe.delete("", prefix=True)
        wipe.close()
        self.ctl = HAControllers(tmp, cluster.url, [self.group], ttl=TTL)
        self.etcd = EtcdClient(cluster.endpoints)
        self.agents: dict[str, Agent] = {}
        self.active: set[str] = set()  # members that must converge
        self.evicted: set[str] = set()  # revoked spares whose agents still run (checked once, then stopped)
        self.paused: int | None = None
        self.spare_no = 0
        # what has been seen so far
        self.msg_content: dict[int, tuple[Any, ...]] = {}
        self.msg_seen_by: dict[int, str] = {}
        self.epoch_kek: dict[int, str] = {}
        self.spi_key: dict[str, str] = {}
        self.spi_alloc: dict[str, int] = {}  # etcd key -> create revision
        self.last_msg_id = 0
        self.counts = {"kill": 0, "pause": 0, "rekey": 0, "rekey-kek": 0, "revoke": 0, "leader-hit": 0}
        self.applied: set[tuple[str, int, str]] = set()  # (member, msg_id, source) applications seen

    # ---- set-up ------------------------------------------------------------------------------

    def start(self) -> None:
        bundles = {"alice": self.ctl.add_member("alice", "video:sender")}
        for n in ("bob", "carol"):
            bundles[n] = self.ctl.add_member(n, "video:receiver")
        url = self.ctl.start_all()
        self.agents["alice"] = Agent(self.tmp, "alice", bundles["alice"], url, [{"name": "video", "role": "sender"}])
        for n in ("bob", "carol"):
            self.agents[n] = Agent(self.tmp, n, bundles[n], url, [{"name": "video", "role": "receiver"}])
        for a in self.agents.values():
            a.start()
        self.active = set(self.agents)
        for _ in range(SPARES):
            self.add_spare()
        for a in self.agents.values():
            a.wait_registered("video", timeout=30)

    def add_spare(self) -> str:
        name = f"spare{self.spare_no}"
        self.spare_no += 1
        bundle = self.ctl.add_member(name, "video:receiver")
        a = Agent(self.tmp, name, bundle, self.ctl.agent_url, [{"name": "video", "role": "receiver"}])
        self.agents[name] = a.start()
        self.active.add(name)
        return name

    def stop(self) -> None:
        for a in self.agents.values():
            a.stop()
        if self.paused is not None:
            p = self.ctl.procs[self.paused]
            if p is not None:
                p.send_signal(signal.SIGCONT)
        self.ctl.stop()
        self.etcd.close()

    # ---- faults and operations ----------------------------------------------------------------

    def live(self, exclude: int | None = None) -> list[int]:
        return [i for i, p in enumerate(self.ctl.procs) if p is not None and i != self.paused and i != exclude]

    def operate(self, op: str | None, exclude: int | None) -> str:
        if op is None:
            return ""
        i = self.rng.choice(self.live(exclude))
        if op in ("rekey", "rekey-kek"):
            self.ctl.cli(i, "rekey", "video", *(["--kek"] if op == "rekey-kek" else []))
            self.counts[op] += 1
            return f" {op} via {self.ctl.names[i]}"
        spares = sorted(n for n in self.active if n.startswith("spare"))
        victim = self.rng.choice(spares)
        self.ctl.cli(i, "member", "revoke", victim)
        self.active.discard(victim)
        self.evicted.add(victim)
        self.counts["revoke"] += 1
        return f" revoke {victim} via {self.ctl.names[i]}"

    def step(self, n: int) -> str:
        rng = self.rng
        leader = self.ctl.leader()
        if leader is not None and rng.random() < 0.6:
            target = self.ctl.index(leader)
            self.counts["leader-hit"] += 1
        else:
            target = rng.randrange(len(self.ctl.names))
        fault = rng.choice(["kill", "pause"])
        ops = [None, None, "rekey", "rekey", "rekey-kek", "revoke"]
        during, after = rng.choice(ops), rng.choice(ops)
        name = self.ctl.names[target]
        what = f"step {n:2d}: {fault} {name}{' (leader)' if name == leader else ''}"
        self.counts[fault] += 1
        if fault == "kill":
            self.ctl.signal(name, signal.SIGKILL)
            time.sleep(rng.uniform(0.0, 1.0))
            what += self.operate(during, target)
            self.ctl.start(target)
            what += ", restarted"
        else:
            self.ctl.signal(name, signal.SIGSTOP)
            self.paused = target
            t0 = time.monotonic()
            what += self.operate(during, target)
            time.sleep(max(0.0, TTL + 0.5 + rng.uniform(0.0, 1.0) - (time.monotonic() - t0)))
            self.ctl.signal(name, signal.SIGCONT)
            self.paused = None
            what += f", resumed after {time.monotonic() - t0:.1f} s"
        what += (";" + self.operate(after, None)) if after else ""
        return what

    # ---- convergence and invariants ----------------------------------------------------------------

    def converge(self, timeout: float = 25.0) -> dict[str, Any]:
        def agreed() -> dict[str, Any] | None:
            if self.pending():
                return None
            st = level_state(self.ctl.url, self.ctl.ca_home, "video")
            want = (st["msg_id"], st["kek_epoch"], kek_id(st["keks"][st["kek_epoch"]]))
            for n in self.active:
                g = self.agents[n].group("video") or {}
                if (g.get("msg_id"), g.get("kek_epoch"), g.get("kek_id")) != want:
                    return None
            return st

        try:
            return wait_for(agreed, timeout, "every member to hold the committed msg_id and KEK",  # type: ignore[no-any-return]
                            interval=0.1)
        except AssertionError:
            st = level_state(self.ctl.url, self.ctl.ca_home, "video")
            have = {n: {k: (self.agents[n].group("video") or {}).get(k) for k in ("msg_id", "kek_epoch", "kek_id")}
                    for n in sorted(self.active)}
            raise AssertionError(f"members did not converge on msg_id {st['msg_id']} / KEK epoch "
                                 f"{st['kek_epoch']} ({kek_id(st['keks'][st['kek_epoch']])}): {have}") from None

    def pending(self) -> list[str]:
        """Requests forwarded to the leader and not yet done, and evictions not yet carried out."""
        kvs, _ = self.etcd.range(DATA + "request/q/", prefix=True)
        out = [kv.key for kv in kvs]
        if self.evicted:
            from groupsec.controller.ha import open_etcd_store

            s = open_etcd_store(self.ctl.ca_home, self.ctl.url)
            try:
                out += [n for n in self.evicted if not (s.get(f"member/{n}") or {}).get("evicted")]
            finally:
                s.close()
        return out

    def check(self, st: dict[str, Any], where: str) -> None:
        # the committed state: msg IDs never go backwards, one KEK per epoch
        assert st["msg_id"] >= self.last_msg_id, f"{where}: committed msg_id went back to {st['msg_id']}"
        self.last_msg_id = st["msg_id"]
        for e, k in st["keks"].items():
            self._one(self.epoch_kek, int(e), kek_id(k), f"{where}: committed KEK of epoch {e}")
        # SPI allocations: each created once, never deleted
        kvs, _ = self.etcd.range(DATA + "spi/", prefix=True)
        now = {kv.key: kv.create_revision for kv in kvs}
        for k, rev in self.spi_alloc.items():
            assert now.get(k) == rev, f"{where}: SPI allocation {k} re-created or deleted ({rev} -> {now.get(k)})"
        self.spi_alloc = now
        allocated = {k.rsplit("/", 1)[1] for k in now if k.startswith(f"{DATA}spi/{self.group.dst}/")}
        # what the members applied
        for n, a in self.agents.items():
            status = a.status() or {}
            g = a.group("video") or {}
            if g.get("kek_epoch") is not None:
                self._one(self.epoch_kek, g["kek_epoch"], g["kek_id"], f"{where}: {n}'s KEK of epoch {g['kek_epoch']}")
            for sa in g.get("sas", []):
                assert sa["spi"][2:] in allocated, f"{where}: {n} holds SA {sa['spi']} that etcd never allocated"
            for rec in status.get("agent", {}).get("applied", []):
                self.applied.add((n, rec["msg_id"], rec["source"]))
                self._one(self.epoch_kek, rec["kek_epoch"], rec["kek_id"],
                          f"{where}: {n} applied msg_id {rec['msg_id']} with KEK epoch {rec['kek_epoch']}")
                for spi, key in rec["sas"].items():
                    self._one(self.spi_key, spi, key, f"{where}: {n}'s SA {spi}")
                    assert spi[2:] in allocated, f"{where}: {n} applied SA {spi} that etcd never allocated"
                content = (rec["kek_epoch"], rec["kek_id"], tuple(rec["newest"]))
                mid = rec["msg_id"]
                if rec["kind"] == "grant":
                    # A grant is a state snapshot, not message msg_id: after a flat-level eviction
                    # the new KEK is pushed in grants before the TEK rekey under it (msg_id + 1),
                    # so a grant at msg_id N may already hold the next KEK. Only rekey messages
                    # must mean one thing everywhere; grants are checked by the KEK-per-epoch,
                    # SPI and eviction invariants.
                    continue
                if mid in self.msg_content:
                    assert self.msg_content[mid] == content, (
                        f"{where}: msg_id {mid} meant {self.msg_content[mid]} to {self.msg_seen_by[mid]} "
                        f"but {content} to {n} ({rec['kind']} via {rec['source']})")
                else:
                    self.msg_content[mid], self.msg_seen_by[mid] = content, n
        # an evicted spare never gets the KEK minted by (or after) its eviction
        for n in self.evicted:
            g = self.agents[n].group("video") or {}
            assert (g.get("kek_epoch") or 0) < st["kek_epoch"], f"{where}: evicted {n} holds KEK epoch {g['kek_epoch']}"

    @staticmethod
    def _one(seen: dict[Any, str], k: Any, v: str, what: str) -> None:
        assert seen.setdefault(k, v) == v, f"{what} is {v}, but {seen[k]} was seen before"

    def retire_evicted(self) -> None:
        """Stop evicted spares' agents (after one check) and bring in fresh spares."""
        for n in sorted(self.evicted):
            self.agents[n].stop()
            self.add_spare()
        self.evicted.clear()


@pytest.mark.slow
def test_no_split_brain_under_random_kills_and_pauses(tmp_path, cluster):
    # A fixed default seed keeps CI's choice of faults stable (timing still varies run to run);
    # GROUPSEC_CHAOS_SEED=random explores new sequences, any number replays one.
    env_seed = os.environ.get("GROUPSEC_CHAOS_SEED", str(DEFAULT_SEED))
    seed = random.SystemRandom().randrange(1 << 32) if env_seed == "random" else int(env_seed)
    print(f"\nchaos seed {seed} (replay: GROUPSEC_CHAOS_SEED={seed}), {STEPS} steps, lease TTL {TTL} s", flush=True)
    t0 = time.monotonic()
    chaos = Chaos(tmp_path, cluster, seed)
    try:
        chaos.start()
        chaos.check(chaos.converge(), "start")
        for n in range(STEPS):
            what = chaos.step(n)
            st = chaos.converge()
            chaos.check(st, what)
            print(f"{what}  -> msg_id {st['msg_id']} KEK epoch {st['kek_epoch']} ({time.monotonic() - t0:.0f} s)", flush=True)
            chaos.retire_evicted()
        logs = {n: chaos.ctl.log_text(n) for n in chaos.ctl.names}
    finally:
        chaos.stop()
    print(f"chaos done in {time.monotonic() - t0:.0f} s: {chaos.counts}, {len(chaos.applied)} applications of "
          f"{len(chaos.msg_content)} msg_ids, "
          f"{len(chaos.epoch_kek)} KEK epochs, {len(chaos.spi_alloc)} SPIs allocated")
    assert chaos.counts["kill"] + chaos.counts["pause"] == STEPS
    assert len(chaos.epoch_kek) >= 2  # the run really rekeyed
    assert len(chaos.msg_content) > STEPS // 2
    for n, text in logs.items():
        assert "Traceback" not in text, f"{n} logged a traceback:\n{text[text.index('Traceback'):][:3000]}"
