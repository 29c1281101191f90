"""EtcdStore, sealing and the leader election against a real 3-node etcd cluster."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import trio

from groupsec.controller.etcd import EtcdClient, parse_endpoints
from groupsec.controller.etcdstore import DATA, EtcdStore, NotLeader
from groupsec.controller.leader import Election
from groupsec.controller.sealing import FileKeyProvider, SealError, load_store_key
from groupsec.controller.store import MemoryStore
from groupsec.errors import ConfigError

_OPEN: list[EtcdClient] = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _OPEN:
        _OPEN.pop().close()


def _client(cluster) -> EtcdClient:
    c = EtcdClient(cluster.endpoints)
    _OPEN.append(c)
    return c


def _store(cluster, sealer, fence=None) -> EtcdStore:
    # every test its own prefix: the cluster is shared by the module
    return EtcdStore(_client(cluster), sealer, fence, prefix=f"{DATA}{uuid.uuid4().hex}/")


def test_parse_endpoints() -> None:
    assert parse_endpoints("etcd://a:1,10.0.0.2:2379,[::1]:3") == [("a", 1), ("10.0.0.2", 2379), ("::1", 3)]
    with pytest.raises(ConfigError):
        parse_endpoints("etcd://nohost")


def test_store_behaves_like_memory_store(cluster, sealer) -> None:
    es, ms = _store(cluster, sealer), MemoryStore()
    for s in (es, ms):
        assert s.commit({"spi/d/1": {"a": 1}, "spi/d/2": [b"x"], "level/g/": {"k": {1: b"k" * 32}}})
        assert not s.commit({"spi/d/3": 1}, absent=["spi/d/1"])  # guard holds: nothing written
        assert s.get("spi/d/3") is None
        assert s.commit({"x": 1}, deletes=["spi/d/2"], absent=["spi/d/9"])
    for prefix in ("spi/", "level/", "", "nothing/"):
        assert es.scan(prefix) == ms.scan(prefix)
    assert es.get("level/g/") == {"k": {1: b"k" * 32}}


def test_dump_reveals_no_value(cluster, sealer) -> None:
    es = _store(cluster, sealer)
    secret = os.urandom(32)
    es.commit({"level/video/": {"keks": {1: secret}}, "member/alice": {"name": "alice-the-member"}})
    raw, _ = _client(cluster).range("", prefix=True)
    blob = b"".join(kv.value for kv in raw)
    assert secret not in blob
    assert secret.hex().encode() not in blob
    assert b"alice-the-member" not in blob
    # another store key cannot read it; a value moved to another key does not open
    with pytest.raises(SealError):
        _store_like(es, FileKeyProvider([os.urandom(32)])).get("level/video/")
    kv = _client(cluster).get(es.prefix + "level/video/")
    _client(cluster).put(es.prefix + "level/other/", kv.value)
    with pytest.raises(SealError):
        es.get("level/other/")


def _store_like(es: EtcdStore, sealer) -> EtcdStore:
    return EtcdStore(es.client, sealer, prefix=es.prefix)


def test_store_key_file_rules(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(os.urandom(32))
    os.chmod(p, 0o644)
    with pytest.raises(ConfigError, match="mode is 0644"):
        load_store_key(p)
    os.chmod(p, 0o600)
    assert load_store_key(p).key_id
    p.write_text("zz")
    with pytest.raises(ConfigError, match="32 random bytes"):
        load_store_key(p)


def test_survives_one_etcd_member_down(cluster, sealer) -> None:
    es = _store(cluster, sealer)
    cluster.stop(0)
    try:
        assert es.commit({"a": 1})
        assert es.get("a") == 1
    finally:
        cluster.start(0)


def _election(cluster, name: str, ttl: int = 2) -> Election:
    return Election(_client(cluster), name, ttl, key=f"/groupsec-test/{uuid.uuid4().hex}/leader")


def test_one_leader_and_fencing(cluster, sealer) -> None:
    a = _election(cluster, "a")
    b = Election(_client(cluster), "b", 2, key=a.key)
    assert a.campaign_once()
    assert not b.campaign_once()
    assert b.leader is not None
    assert b.leader["name"] == "a"
    sa, sb = _store(cluster, sealer, a.fence), None
    sb = EtcdStore(_client(cluster), sealer, b.fence, prefix=sa.prefix)
    assert sa.commit({"level/g/": 1})
    with pytest.raises(NotLeader):
        sb.commit({"level/g/": 2})
    # a is "paused": its lease runs out in etcd while its local state still says leader
    a.valid_until = float("inf")  # simulate a clock that did not notice the pause
    deadline = time.monotonic() + 10
    while not b.campaign_once():
        assert time.monotonic() < deadline, "the lease of a never expired"
        time.sleep(0.2)
    assert sb.commit({"level/g/": 3})
    with pytest.raises(NotLeader):  # etcd itself refuses the deposed leader's txn
        sa.commit({"level/g/": 4, "spi/x/1": 1})
    assert sa.get("level/g/") == 3
    assert sa.get("spi/x/1") is None
    assert sa.fenced_out == 1
    assert sa.commit({"ack/alice": {"m": 1}})  # acknowledgements are not leader decisions
    b.resign()
    for e in (a, b):
        e.close()


async def _until(pred) -> None:
    while True:
        if pred():
            return
        await trio.sleep(0.02)


async def test_election_loop_failover(cluster) -> None:
    key = f"/groupsec-test/{uuid.uuid4().hex}/leader"
    es = [Election(_client(cluster), n, 2, key=key, poll=0.05) for n in "abc"]
    events: list[tuple[str, str]] = []
    for e in es:
        e.on_elected = lambda e=e: events.append(("elected", e.name))
        e.on_deposed = lambda e=e: events.append(("deposed", e.name))
    async with trio.open_nursery() as n:
        scopes = []
        for e in es:
            cs = trio.CancelScope()
            scopes.append(cs)

            async def run(e=e, cs=cs) -> None:
                with cs:
                    await e.run()
            n.start_soon(run)
        with trio.fail_after(10):
            await _until(lambda: sum(e.is_leader() for e in es) == 1)
        first = next(i for i, e in enumerate(es) if e.is_leader())
        scopes[first].cancel()  # graceful stop revokes the lease: the next leader is quick
        t0 = time.monotonic()
        with trio.fail_after(5):
            await _until(lambda: any(e.is_leader() for i, e in enumerate(es) if i != first))
        assert time.monotonic() - t0 < 2
        assert sum(e.is_leader() for e in es) == 1
        n.cancel_scope.cancel()
    for e in es:
        e.close()
    assert next(x for x in events if x[0] == "elected")[1] == es[first].name
