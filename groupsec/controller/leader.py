"""Leader election through an etcd lease (exactly one leader; fencing by create revision).

    election = Election(EtcdClient(endpoints), "ctl-a", ttl=3, info={"addr": "10.0.0.1:7443"})
    store = EtcdStore(client, sealer, fence=election.fence)
    async with trio.open_nursery() as n:
        n.start_soon(election.run)            # campaigns, keeps the lease alive, steps down

A controller becomes leader by creating ``/groupsec/leader`` (``create_revision == 0``
compare) attached to its own lease. The txn's revision is the leader's *term token*: every
fenced store commit compares the leader key's create revision with it, so once the lease
expired (the controller died, was paused or cut off) and someone else created the key, the
old leader's writes fail in etcd, whatever its local clock believes.

Locally a leader also stops acting (``is_leader()`` false) as soon as its last successful
keepalive is older than the TTL minus a margin: the local deadline always ends before etcd's
(the keepalive was sent after ``t0``, so etcd's expiry is later than ``t0 + ttl``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from groupsec.controller.etcd import Compare, EtcdClient, EtcdError, absent
from groupsec.controller.etcdstore import LEADER_KEY, NotLeader

log = logging.getLogger("groupsec.controller.leader")


class Election:
    def __init__(self, client: EtcdClient, name: str, ttl: int = 5, *, key: str = LEADER_KEY,
                 info: dict[str, Any] | None = None, poll: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 2:
            raise ValueError("lease TTL must be at least 2 s")
        self.client = client.clone()  # its own connection: the election never waits behind the store
        self.name = name
        self.ttl = ttl
        self.key = key
        self.info = dict(info or {})
        self.poll = poll
        self.clock = clock
        self.margin = max(0.3, ttl * 0.15)
        self.lease = 0
        self.token: int | None = None
        self.valid_until = 0.0
        self.leader: dict[str, Any] | None = None  # the current leader's record (as last seen)
        self.terms = 0
        self.on_elected: Callable[[], None] = lambda: None
        self.on_deposed: Callable[[], None] = lambda: None
        self.elected_at: float | None = None

    # ---- the fence ---------------------------------------------------------------------------

    def is_leader(self) -> bool:
        return self.token is not None and self.clock() < self.valid_until

    def fence(self) -> list[Compare]:
        """The compare that makes a store commit conditional on this controller's term."""
        if not self.is_leader():
            raise NotLeader(f"{self.name} is not the leader")
        assert self.token is not None
        return [Compare(self.key, "CREATE", self.token)]

    # ---- blocking steps (run in a thread) ---------------------------------------------------

    def campaign_once(self) -> bool:
        t0 = self.clock()
        if not self.lease:
            self.lease = self.client.grant(self.ttl)
        rec = {"name": self.name, "lease": self.lease, **self.info}
        ok, rev, ranges = self.client.txn([absent(self.key)], {self.key: json.dumps(rec).encode()},
                                          lease=self.lease, failure_ranges=[self.key])
        if ok:
            self.token, self.valid_until = rev, t0 + self.ttl - self.margin
            self.leader = rec
            return True
        cur = ranges[0][0] if ranges and ranges[0] else None
        self.leader = _record(cur.value) if cur is not None else None
        if self.leader and self.leader.get("lease") != self.lease:
            # keep our lease alive while waiting, so the next attempt is one txn
            if self.client.keepalive(self.lease) <= 0:
                self.lease = 0
        return False

    def keepalive_once(self) -> bool:
        t0 = self.clock()
        ttl = self.client.keepalive(self.lease)
        if ttl <= 0:
            return False
        kv = self.client.get(self.key)
        if kv is None or kv.create_revision != self.token:
            return False
        self.valid_until = t0 + min(ttl, self.ttl) - self.margin
        return True

    def resign(self) -> None:
        """Give the leadership up at once (graceful stop): revoke the lease."""
        lease, self.lease, self.token = self.lease, 0, None
        if lease:
            try:
                self.client.revoke(lease)
            except EtcdError as exc:
                log.warning("could not revoke lease on stop: %s", exc)

    def close(self) -> None:
        self.client.close()

    # ---- the trio loop -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                if self.token is None:
                    await self._campaign()
                else:
                    await self._hold()
        finally:
            with trio.CancelScope(shield=True):
                if self.token is not None or self.lease:
                    await trio.to_thread.run_sync(self.resign)

    async def _campaign(self) -> None:
        try:
            won = await trio.to_thread.run_sync(self.campaign_once)
        except EtcdError as exc:
            log.warning("election: %s", exc)
            self.lease = 0
            won = False
        if won:
            self.terms += 1
            self.elected_at = time.time()
            log.info("%s is the leader (term token %s, lease TTL %d s)", self.name, self.token, self.ttl)
            try:
                self.on_elected()
            except NotLeader:
                self._deposed("lost the lease while taking over")
            return
        await trio.sleep(self.poll)

    async def _hold(self) -> None:
        await trio.sleep(min(self.ttl / 4, max(0.05, self.valid_until - self.clock() - 0.05)))
        if not self.is_leader():
            self._deposed("lease deadline passed without a keepalive")
            return
        try:
            ok = await trio.to_thread.run_sync(self.keepalive_once)
        except EtcdError as exc:
            log.warning("keepalive failed: %s", exc)
            ok = self.is_leader()  # retry until the local deadline passes
            if not ok:
                self._deposed("etcd unreachable until the lease deadline")
            return
        if not ok:
            self._deposed("the lease expired or the leader key changed hands")

    def _deposed(self, why: str) -> None:
        if self.token is None:
            return
        log.warning("%s is no longer the leader: %s", self.name, why)
        self.token = None
        self.lease = 0
        self.elected_at = None
        self.on_deposed()

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "leader": (self.leader or {}).get("name") if self.token is None else self.name,
                "is_leader": self.is_leader(), "ttl": self.ttl, "terms": self.terms}


def _record(data: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(data)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None
