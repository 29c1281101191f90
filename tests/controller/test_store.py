"""The Store interface, SQLite and in memory: atomic commits with an absence guard, prefix
scans, durability across a reopen, file modes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from groupsec.controller.store import MemoryStore, SQLiteStore


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    s = SQLiteStore(tmp_path / "s.db") if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()


def test_commit_get_scan_delete(store):
    assert store.commit({"spi/a/1": {"g": "x"}, "spi/a/2": {"g": "y"}, "spi/b/1": [1, b"k"]})
    assert store.get("spi/a/1") == {"g": "x"}
    assert store.get("nope") is None
    assert [k for k, _ in store.scan("spi/a/")] == ["spi/a/1", "spi/a/2"]
    assert store.commit({"spi/c": 1}, deletes=["spi/a/1"])
    assert store.get("spi/a/1") is None


def test_absent_guard_is_atomic(store):
    store.commit({"spi/x": 1})
    assert not store.commit({"level/g/": {"v": 2}, "spi/y": 1}, (), ["spi/y", "spi/x"])
    assert store.get("level/g/") is None  # nothing of a refused commit is applied
    assert store.get("spi/y") is None


def test_sqlite_survives_kill_9_of_the_writer(tmp_path):
    path = tmp_path / "s.db"
    code = ("import os, signal, sys; from groupsec.controller.store import SQLiteStore\n"
            f"s = SQLiteStore({str(path)!r})\n"
            "for i in range(50): s.commit({f'k/{i}': i})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == -9
    s = SQLiteStore(path)
    try:
        assert [v for _, v in s.scan("k/")] == sorted(range(50), key=str)
    finally:
        s.close()
    assert os.stat(path).st_mode & 0o777 == 0o600
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(path) + suffix):
            assert os.stat(str(path) + suffix).st_mode & 0o777 == 0o600
