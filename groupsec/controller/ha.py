"""Several controllers on one etcd cluster: the trio shell around the election.

    ha = HAControl.open(home, config, "etcd://h1:2379,...", [store_key], name, ttl)
    app = ControllerApp(config, ha.store, signing_key, home); ha.attach(app, server)
    nursery.start_soon(ha.run)

* Leader (the election, groupsec.controller.leader): reloads the whole state from etcd when
  elected (message IDs, KEK epochs, SPIs continue from there), finishes pending evictions,
  resends the last rekey of every level signed with ITS key, then runs the rekey scheduler
  (gated by ``app.is_leader``) and executes requests queued by followers.
* Follower: serves registrations and resyncs from the replicated state. It polls the level
  and member records every 0.2 s (not an etcd watch: through the JSON gateway a watch is a
  long-lived chunked stream to read from a thread, re-establish after an etcd member
  failover or a compaction, and guard with progress notifications against silent stalls;
  the poll is two small reads, and its lag only delays the redundant unicast copy of a
  rekey, since members ignore grants older than what they hold); when the leader changed a level, it pushes a fresh grant to its own
  sessions (their unicast rekey); when a member was revoked, it closes that member's sessions.
  Mutating admin requests (rekey, revoke, reload) are queued in etcd for the leader.
* Every controller publishes ``/groupsec/controllers/<name>`` (address, the etcd revision it
  has applied, a lease so dead ones vanish) and its CA-certified rekey key under
  ``/groupsec/rekeycerts/<name>``; all those certificates go to members in Registered.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from groupsec.controller.app import ControllerApp
from groupsec.controller.etcd import EtcdClient, EtcdError, parse_endpoints
from groupsec.controller.etcdstore import CONTROLLERS, ROOT, EtcdStore, NotLeader
from groupsec.controller.groups import GroupManager
from groupsec.controller.leader import Election
from groupsec.controller.sealing import load_store_key

log = logging.getLogger("groupsec.controller.ha")
REKEY_CERTS = ROOT + "rekeycerts/"
MUTATING = ("rekey", "revoke", "reload")


def store_key_paths(home: Path, given: list[str] | None) -> list[str]:
    if given:
        return given
    env = os.environ.get("GROUPSEC_STORE_KEY")
    return [env] if env else [str(home / "store.key")]


def open_etcd_store(home: Path, url: str, store_keys: list[str] | None = None) -> EtcdStore:
    """An unfenced store for operator commands (`groupsec member add` with an etcd state)."""
    return EtcdStore(EtcdClient(parse_endpoints(url)), load_store_key(*store_key_paths(home, store_keys)))


class HAControl:
    def __init__(self, client: EtcdClient, store: EtcdStore, election: Election, name: str,
                 rekey_cert: bytes, poll: float = 0.2) -> None:
        self.client = client
        self.store = store
        self.election = election
        self.name = name
        self.rekey_cert = rekey_cert
        self.poll = poll
        self.app: ControllerApp | None = None
        self.server: Any = None
        self.addr = ""
        self._seen: dict[str, int] = {}
        self._synced_at = time.time()
        self._reg_client = client.clone()
        self._base_admin: Any = None
        self._took_over = False  # elected AND the state reloaded: only then does the app act as leader
        self.counters: dict[str, int] = {"grants-pushed": 0, "requests-done": 0, "forwarded": 0}

    @classmethod
    def open(cls, home: Path, url: str, store_keys: list[str] | None, name: str, ttl: int) -> HAControl:
        from groupsec.controller.hapki import load_rekey_cert_der

        client = EtcdClient(parse_endpoints(url))
        election = Election(client, name, ttl)
        store = EtcdStore(client, load_store_key(*store_key_paths(home, store_keys)), election.fence)
        return cls(client, store, election, name, load_rekey_cert_der(home))

    def attach(self, app: ControllerApp, server: Any) -> None:
        self.app, self.server = app, server
        app.is_leader = self.acting
        self.election.on_elected = self._elected
        self.election.on_deposed = self._deposed
        self._base_admin = server.admin
        server.admin = self.admin

    # ---- leadership ----------------------------------------------------------------------

    def _fresh_manager(self) -> None:
        assert self.app is not None
        self.app.manager = GroupManager(self.app.config, self.store)  # drop every cached state
        self._seen = {}

    def acting(self) -> bool:
        """The app's leader gate (rekey scheduler, sender IDs, queued requests): the lease is
        ours AND the takeover finished. The election wins its txn in a worker thread, so other
        trio tasks could otherwise see ``is_leader()`` before ``_elected`` reloaded the state."""
        return self._took_over and self.election.is_leader()

    def _elected(self) -> None:
        assert self.app is not None
        self._took_over = False
        self._fresh_manager()
        try:
            self.app.start()  # state from etcd: load_or_create, pending evictions, resend last rekeys
        except EtcdError as exc:  # a half-done takeover is retried by the next leader (maybe us)
            raise NotLeader(f"takeover failed: {exc}") from None
        self._took_over = True
        self.app.count("elected")

    def _deposed(self) -> None:
        self._took_over = False
        self._fresh_manager()
        assert self.app is not None
        self.app.count("deposed")

    # ---- the loops -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.election.info = {"addr": self.addr, "pid": os.getpid()}
        await trio.to_thread.run_sync(self.client.put, REKEY_CERTS + self.name, self.rekey_cert)
        async with trio.open_nursery() as n:
            await n.start(self.election.run)
            n.start_soon(self._registry_loop)
            task_status.started()
            while True:
                try:
                    if self.acting():
                        self._run_requests()
                    else:
                        self._follow()
                    self._synced_at = time.time()
                except NotLeader:
                    pass
                except (EtcdError, KeyError) as exc:
                    log.warning("state refresh failed: %s", exc)
                await trio.sleep(self.poll)

    def _follow(self) -> None:
        """Pick up the leader's changes; push grants and close revoked members' sessions."""
        app = self.app
        assert app is not None
        vers = {**self.store.versions("level/"), **self.store.versions("member/")}
        first = not self._seen
        # members first: a revocation is committed before the eviction's new KEK, so closing
        # revoked members' sessions before pushing the changed levels' grants means a revoked
        # member never gets the KEK minted to exclude it (the chaos test caught exactly that)
        changed = sorted((k for k, v in vers.items() if self._seen.get(k) != v), key=lambda k: not k.startswith("member/"))
        self._seen = vers
        if first:
            app.manager.levels.clear()
            return
        for k in changed:
            if k.startswith("member/"):
                rec = self.store.get(k)
                if rec and rec.get("revoked"):
                    for h in list(app.sessions.get(rec["name"], ())):
                        h.session.close_with("revoked", f"{rec['name']} was revoked")
                        h.wake()
                continue
            _, group, level = k.split("/", 2)
            old = app.manager.levels.pop((group, level), None)
            lc = app.config.levels.get((group, level))
            if lc is None:
                continue
            st = app.manager.state(group, level)
            if old is not None and (old["msg_id"], old["kek_epoch"]) == (st["msg_id"], st["kek_epoch"]):
                continue
            for h in app.level_handles(lc.key):
                if h.roles.get(lc.key) and h.session.push_grant(app.manager.grant(h.session.identity, lc,
                                                                                  h.roles[lc.key])):
                    self.counters["grants-pushed"] += 1
                    h.wake()

    def _run_requests(self) -> None:
        for k, req in self.store.scan("request/q/"):
            rid = k.rsplit("/", 1)[1]
            req = self._still_to_do(req if isinstance(req, dict) else {})
            try:
                reply = self._base_admin(req) if req else {"ok": True, "levels": 0, "already": True}
            except NotLeader:
                return
            self.store.commit({f"request/r/{rid}": reply}, deletes=[k])
            self.counters["requests-done"] += 1

    def _still_to_do(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """A forwarded revoke whose members were already evicted (a new leader finishes pending
        evictions when it takes over, before it reads the queue) must not evict them again:
        that would mint a second, pointless KEK."""
        if req.get("op") != "revoke":
            return req
        names = [req["name"]] if isinstance(req.get("name"), str) else list(req.get("names") or [])
        left = [n for n in names if not (isinstance(n, str) and (self.store.get(f"member/{n}") or {}).get("evicted"))]
        if not left:
            return None
        return {"op": "revoke", "names": left} if len(left) > 1 else {"op": "revoke", "name": left[0]}

    async def _registry_loop(self) -> None:
        ttl = max(2, self.election.ttl)
        lease = 0
        c = self._reg_client
        while True:
            rec = {"name": self.name, "addr": self.addr, "pid": os.getpid(), "leader": self.election.is_leader(),
                   "revision": self.store.revision, "synced": self._synced_at, "time": time.time()}
            try:
                if not lease:
                    lease = await trio.to_thread.run_sync(c.grant, ttl * 2)
                await trio.to_thread.run_sync(c.put, CONTROLLERS + self.name,
                                              json.dumps(rec).encode(), lease)
                certs, _ = await trio.to_thread.run_sync(c.range, REKEY_CERTS, True)
                if self.app is not None:
                    self.app.rekey_certs = [kv.value for kv in certs]
                await trio.to_thread.run_sync(c.keepalive, lease)
            except EtcdError as exc:
                log.debug("registry: %s", exc)
                lease = 0
            await trio.sleep(1.0)

    # ---- admin ---------------------------------------------------------------------------

    def admin(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op in MUTATING and not self.acting():
            rid = uuid.uuid4().hex
            self.store.commit({f"request/q/{rid}": dict(req)})
            self.counters["forwarded"] += 1
            leader = (self.election.leader or {}).get("name")
            return {"ok": True, "forwarded": leader or "(no leader yet)", "request": rid, "rekeyed": [], "levels": 0}
        try:
            reply = self._base_admin(req)
        except NotLeader as exc:
            return {"ok": False, "error": f"not-leader: {exc}"}
        if op == "status" and reply.get("ok"):
            reply["status"]["ha"] = self.status()
        return reply

    def status(self) -> dict[str, Any]:
        now = time.time()
        ctls = []
        try:
            kvs, rev = self.client.range(CONTROLLERS, prefix=True)
        except EtcdError as exc:
            return {"controller": self.name, "error": str(exc)[:200]}
        for kv in kvs:
            try:
                r = json.loads(kv.value)
            except ValueError:
                continue
            ctls.append({"name": r.get("name"), "addr": r.get("addr"), "leader": bool(r.get("leader")),
                         "lag_revisions": max(0, rev - int(r.get("revision") or 0)),
                         "lag_s": round(max(0.0, now - float(r.get("synced") or 0)), 3)})
        leader = self.name if self.election.is_leader() else (self.election.leader or {}).get("name")
        return {"controller": self.name, "leader": leader, "is_leader": self.election.is_leader(),
                "lease_ttl": self.election.ttl, "etcd_revision": rev, "controllers": ctls,
                "counters": dict(self.counters), "fenced_out": self.store.fenced_out}
