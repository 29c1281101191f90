"""Durable controller state behind a small key-value interface (the ONLY sqlite3 module).

The interface is deliberately etcd-shaped so a replicated store can replace SQLite later:
string keys, msgpack values, prefix scans, and one atomic ``commit`` per state change
(puts + deletes, with an optional "these keys must not exist" guard, etcd's
``create_revision == 0`` compare). Key layout (see groupsec.controller.groups):

    member/<name>              member record (groups, revoked, cert serial)
    revoked/<serial hex>       revoked certificate serials
    level/<group>/<level>      level state: KEK epochs, msg_id, TEK generations, sender IDs
    spi/<dst>/<spi hex>        SPI allocations (never deleted: an SPI is never reused)
    rekey/<group>/<level>      the last rekey message sent (resent unchanged after a crash)
    ack/<member>               the member's last acknowledgements (written in batches)
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from typing import Any, Protocol

import msgpack


def encode(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Store(Protocol):
    def get(self, key: str) -> Any | None: ...

    def scan(self, prefix: str) -> list[tuple[str, Any]]: ...

    def commit(self, puts: dict[str, Any], deletes: Iterable[str] = (), absent: Iterable[str] = ()) -> bool:
        """Apply all puts and deletes atomically and durably; return False (and change nothing)
        if one of ``absent`` exists."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """The same interface in memory (tests, pure state-machine runs)."""

    def __init__(self) -> None:
        self._d: dict[str, bytes] = {}
        self.commits = 0

    def get(self, key: str) -> Any | None:
        v = self._d.get(key)
        return None if v is None else decode(v)

    def scan(self, prefix: str) -> list[tuple[str, Any]]:
        return [(k, decode(v)) for k, v in sorted(self._d.items()) if k.startswith(prefix)]

    def commit(self, puts: dict[str, Any], deletes: Iterable[str] = (), absent: Iterable[str] = ()) -> bool:
        if any(k in self._d for k in absent):
            return False
        for k in deletes:
            self._d.pop(k, None)
        self._d.update({k: encode(v) for k, v in puts.items()})
        self.commits += 1
        return True

    def close(self) -> None:
        pass


class SQLiteStore:
    """SQLite in WAL mode, one transaction per commit, synchronous=FULL, file mode 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        for suffix in ("-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.chmod(self.path + suffix, 0o600)
        self.commits = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else decode(row[0])

    def scan(self, prefix: str) -> list[tuple[str, Any]]:
        hi = prefix + "\U0010ffff"
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                                    (prefix, hi)).fetchall()
        return [(k, decode(v)) for k, v in rows]

    def commit(self, puts: dict[str, Any], deletes: Iterable[str] = (), absent: Iterable[str] = ()) -> bool:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for k in absent:
                    if cur.execute("SELECT 1 FROM kv WHERE key = ?", (k,)).fetchone():
                        cur.execute("ROLLBACK")
                        return False
                cur.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in deletes])
                cur.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
                                [(k, encode(v)) for k, v in puts.items()])
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self.commits += 1
            return True

    def close(self) -> None:
        with self._lock:
            self._db.close()
