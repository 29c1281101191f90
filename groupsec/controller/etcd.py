"""The ONLY etcd client module: etcd's v3 JSON gateway (``/v3/...``, etcd >= 3.4) over plain
HTTP with the standard library.

Blocking by design: the controller's ``Store`` interface is synchronous (like SQLite), and
loopback/LAN round trips are a millisecond or two. Trio code that must not block (the leader
election loop) calls it through ``trio.to_thread.run_sync``. One ``EtcdClient`` per thread
(``http.client`` connections are not thread-safe); ``EtcdClient.clone()`` makes another.

Keys and values travel base64-encoded; int64 fields are JSON strings. Endpoints are tried in
order; a connection failure or a 5xx moves to the next one (and that one is kept afterwards).
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from groupsec.errors import ConfigError, GroupSecError


class EtcdError(GroupSecError):
    """etcd is unreachable from every endpoint, or answered with an error."""


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    def __repr__(self) -> str:  # values may hold sealed secrets: never print them
        return f"KV({self.key!r}, {len(self.value)} bytes, rev {self.mod_revision})"


@dataclass(frozen=True)
class Compare:
    """One txn guard. ``target``: "CREATE" | "MOD" | "VALUE" | "VERSION" | "LEASE";
    ``result``: "EQUAL" | "NOT_EQUAL" | "GREATER" | "LESS"."""

    key: str
    target: str
    value: int | bytes
    result: str = "EQUAL"

    def to_json(self) -> dict[str, Any]:
        field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version",
                 "LEASE": "lease", "VALUE": "value"}[self.target]
        v: Any = _b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": _b64(self.key.encode()), "target": self.target, "result": self.result, field: v}


def absent(key: str) -> Compare:
    return Compare(key, "CREATE", 0)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix"."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


def parse_endpoints(url: str) -> list[tuple[str, int]]:
    """``etcd://host:port[,host:port...]`` (or a bare list) -> [(host, port)]."""
    text = url[len("etcd://"):] if url.startswith("etcd://") else url
    out = []
    for part in text.rstrip("/").split(","):
        u = urlsplit("//" + part.strip())
        if not u.hostname or u.port is None:
            raise ConfigError(f"--store {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
        out.append((u.hostname, u.port))
    return out


class EtcdClient:
    def __init__(self, endpoints: Sequence[tuple[str, int]], timeout: float = 2.0) -> None:
        if not endpoints:
            raise ConfigError("etcd: no endpoints")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._i = 0
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self.requests = 0
        self.failovers = 0

    def clone(self) -> EtcdClient:
        return EtcdClient(self.endpoints, self.timeout)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---- transport -------------------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any], endpoint: tuple[str, int] | None = None) -> dict[str, Any]:
        """POST one gateway request; fail over across endpoints on connection errors."""
        with self._lock:
            if endpoint is not None:
                return self._once(endpoint, path, body, own=False)
            last: Exception | None = None
            for _ in range(len(self.endpoints)):
                ep = self.endpoints[self._i]
                try:
                    return self._once(ep, path, body, own=True)
                except (OSError, http.client.HTTPException, _Unavailable) as exc:
                    last = exc
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None
                    self._i = (self._i + 1) % len(self.endpoints)
                    self.failovers += 1
            raise EtcdError(f"etcd unavailable at {self._names()}: {last}")

    def _names(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def _once(self, ep: tuple[str, int], path: str, body: dict[str, Any], own: bool) -> dict[str, Any]:
        conn = self._conn if own else None
        if conn is None:
            conn = http.client.HTTPConnection(ep[0], ep[1], timeout=self.timeout)
            if own:
                self._conn = conn
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            if not own:
                conn.close()
        self.requests += 1
        if resp.status >= 500 or resp.status == 429:
            raise _Unavailable(f"{ep[0]}:{ep[1]}: HTTP {resp.status}: {data[:200]!r}")
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            raise EtcdError(f"etcd {ep[0]}:{ep[1]}{path}: not JSON") from None
        if resp.status != 200 or ("error" in doc and "result" not in doc):
            raise EtcdError(f"etcd {ep[0]}:{ep[1]}{path}: HTTP {resp.status}: {str(doc)[:200]}")
        return doc.get("result", doc) if path.endswith("/keepalive") else doc

    # ---- KV --------------------------------------------------------------------------------

    def range(self, key: str, prefix: bool = False, serializable: bool = False) -> tuple[list[KV], int]:
        """Returns (kvs sorted by key, store revision)."""
        k = key.encode() or (b"\0" if prefix else b"")
        body: dict[str, Any] = {"key": _b64(k)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key.encode()))
        if serializable:
            body["serializable"] = True
        doc = self.call("/v3/kv/range", body)
        return [_kv(d) for d in doc.get("kvs", [])], int(doc["header"]["revision"])

    def get(self, key: str) -> KV | None:
        kvs, _ = self.range(key)
        return kvs[0] if kvs else None

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str, prefix: bool = False) -> int:
        k = key.encode() or (b"\0" if prefix else b"")
        body: dict[str, Any] = {"key": _b64(k)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key.encode()))
        return int(self.call("/v3/kv/deleterange", body).get("deleted", 0))

    def txn(self, compares: Sequence[Compare], puts: dict[str, bytes] | None = None,
            deletes: Sequence[str] = (), lease: int = 0,
            failure_ranges: Sequence[str] = ()) -> tuple[bool, int, list[list[KV]]]:
        """All compares hold -> apply puts and deletes atomically. Returns (succeeded,
        revision, kvs of each ``failure_ranges`` key when it did not)."""
        success: list[dict[str, Any]] = [{"request_delete_range": {"key": _b64(k.encode())}} for k in deletes]
        for k, v in (puts or {}).items():
            p: dict[str, Any] = {"key": _b64(k.encode()), "value": _b64(v)}
            if lease:
                p["lease"] = str(lease)
            success.append({"request_put": p})
        failure = [{"request_range": {"key": _b64(k.encode())}} for k in failure_ranges]
        doc = self.call("/v3/kv/txn", {"compare": [c.to_json() for c in compares], "success": success,
                                       "failure": failure})
        ok = bool(doc.get("succeeded", False))
        ranges = [] if ok else [[_kv(d) for d in r.get("response_range", {}).get("kvs", [])]
                                for r in doc.get("responses", [])]
        return ok, int(doc["header"]["revision"]), ranges

    # ---- leases ----------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh the lease; returns the remaining TTL (0: the lease is gone)."""
        return int(self.call("/v3/lease/keepalive", {"ID": str(lease)}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    # ---- cluster ---------------------------------------------------------------------------

    def status(self, endpoint: tuple[str, int]) -> dict[str, Any]:
        """One member's status (leader id, raft index): for `groupsec status`."""
        return self.call("/v3/maintenance/status", {}, endpoint=endpoint)


class _Unavailable(Exception):
    pass


def _kv(d: dict[str, Any]) -> KV:
    return KV(_unb64(d.get("key")).decode(), _unb64(d.get("value")), int(d.get("create_revision", 0)),
              int(d.get("mod_revision", 0)), int(d.get("lease", 0)))
