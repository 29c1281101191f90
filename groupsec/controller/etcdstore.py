"""EtcdStore: the controller's ``Store`` interface on etcd, for several controllers.

    store = EtcdStore(EtcdClient(parse_endpoints("etcd://h1:2379,h2:2379")), sealer, fence=election.fence)

* Every value is msgpack sealed by ``groupsec.controller.sealing`` (an etcd dump shows key
  names, never key material). Data keys live under ``/groupsec/data/`` (the same layout as
  the SQLite store, see groupsec.controller.store).
* Every ``commit`` is ONE etcd txn. With a ``fence`` (the leader election), the txn also
  compares the leader key's create revision with the token this controller won: a deposed
  or paused leader's commit fails as a whole and raises ``NotLeader``; nothing of it lands.
  ``absent`` keys become ``create_revision == 0`` compares (SPI allocations).
* Writes that are not leader decisions are exempt from the fence (``UNFENCED``): member
  acknowledgements (any controller records the acks of its own sessions) and forwarded
  requests that followers queue for the leader. Operator commands (``groupsec member add``)
  use a store without a fence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from groupsec.controller.etcd import Compare, EtcdClient
from groupsec.controller.etcd import absent as absent_compare
from groupsec.controller.sealing import KeyProvider
from groupsec.controller.store import decode, encode
from groupsec.errors import GroupSecError

ROOT = "/groupsec/"
DATA = ROOT + "data/"
LEADER_KEY = ROOT + "leader"
CONTROLLERS = ROOT + "controllers/"
UNFENCED = ("ack/", "request/")


class NotLeader(GroupSecError):
    """This controller is not (or no longer) the leader: it must not change shared state."""

    code = "not-leader"


class EtcdStore:
    def __init__(self, client: EtcdClient, sealer: KeyProvider,
                 fence: Callable[[], list[Compare]] | None = None, prefix: str = DATA) -> None:
        self.client = client
        self.sealer = sealer
        self.fence = fence
        self.prefix = prefix
        self.commits = 0
        self.fenced_out = 0
        self.revision = 0  # the etcd revision of our last read or write

    def __repr__(self) -> str:
        return f"EtcdStore({self.client.endpoints}, {self.prefix!r})"

    def _open(self, key: str, blob: bytes) -> Any:
        return decode(self.sealer.open_untrusted(key, blob))

    def get(self, key: str) -> Any | None:
        kv = self.client.get(self.prefix + key)
        return None if kv is None else self._open(key, kv.value)

    def scan(self, prefix: str) -> list[tuple[str, Any]]:
        kvs, rev = self.client.range(self.prefix + prefix, prefix=True)
        self.revision = max(self.revision, rev)
        n = len(self.prefix)
        return [(kv.key[n:], self._open(kv.key[n:], kv.value)) for kv in kvs]

    def versions(self, prefix: str) -> dict[str, int]:
        """key -> mod revision (followers use it to see what the leader changed)."""
        kvs, rev = self.client.range(self.prefix + prefix, prefix=True)
        self.revision = max(self.revision, rev)
        n = len(self.prefix)
        return {kv.key[n:]: kv.mod_revision for kv in kvs}

    def commit(self, puts: dict[str, Any], deletes: Iterable[str] = (), absent: Iterable[str] = ()) -> bool:
        dels = list(deletes)
        guards = [absent_compare(self.prefix + k) for k in absent]
        fenced = self.fence is not None and not all(k.startswith(UNFENCED) for k in (*puts, *dels))
        fence = self.fence() if fenced and self.fence is not None else []  # raises NotLeader without a term
        sealed = {self.prefix + k: self.sealer.seal(k, encode(v)) for k, v in puts.items()}
        ok, rev, _ = self.client.txn([*fence, *guards], sealed, [self.prefix + k for k in dels])
        self.revision = max(self.revision, rev)
        if ok:
            self.commits += 1
            return True
        if fence and not self._fence_holds(fence):
            self.fenced_out += 1
            raise NotLeader("the leader lease changed hands: this controller's write was refused by etcd")
        return False

    def _fence_holds(self, fence: list[Compare]) -> bool:
        ok, _, _ = self.client.txn(fence, {}, ())
        return ok

    def close(self) -> None:
        self.client.close()
