"""Helpers for the observability tests: `groupsec serve` / `groupsec-agent run` started with
--metrics-port and --log-format json, /metrics scraped over HTTP and parsed with
prometheus_client's own parser, and a scan of log files for key bytes."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent_helpers import ENV, Agent, Controller, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsController(Controller):
    """The e2e controller, started with --metrics-port, --log-format json and -v (DEBUG)."""

    def start(self, timeout: float = 20.0) -> int:
        self.metrics_port = free_port(socket.SOCK_STREAM)
        port_file = self.tmp / "ctl.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "groupsec.cli", "serve", "-d", str(self.home), "--listen", self.listen,
               "--no-advertise", "--port-file", str(port_file), "-v", "--log-format", "json",
               "--metrics-port", str(self.metrics_port)]
        self.log_file = self.tmp / "ctl.jsonlog"
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), timeout, "the controller's port file")
        self.port = int(port_file.read_text().strip())
        return self.port


class MetricsAgent(Agent):
    """The e2e agent (log_level debug in its agent.toml), with --metrics-port and --log-format json."""

    def start(self) -> MetricsAgent:
        self.metrics_port = free_port(socket.SOCK_STREAM)
        cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config), "--log-format", "json",
               "--metrics-port", str(self.metrics_port)]
        self.log_file = self.dir / "agent.log"
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        return self

    def metrics(self) -> Samples:
        return scrape(self.metrics_port)


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def scrape(port: int) -> Samples:
    """{(sample name, sorted labels): value} from http://127.0.0.1:PORT/metrics."""
    status, text = fetch(port, "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Samples, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def total(m: Samples, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


def key_bytes(obj: Any, out: set[bytes] | None = None) -> set[bytes]:
    """Every bytes value of 16 bytes or more inside a store record (keys, KEKs, signing keys)."""
    out = set() if out is None else out
    if isinstance(obj, bytes | bytearray):
        if len(obj) >= 16:
            out.add(bytes(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            key_bytes(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            key_bytes(v, out)
    return out


def encodings(key: bytes) -> list[str]:
    """The ways a key could show up in a log line."""
    b64 = base64.b64encode(key).decode()
    ub64 = base64.urlsafe_b64encode(key).decode()
    return [key.hex(), key.hex().upper(), key.hex(":"), b64, b64.rstrip("="), ub64.rstrip("="), repr(key)[2:-1]]


def leaked_keys(keys: set[bytes], logs: list[Path]) -> list[tuple[str, str]]:
    found = []
    for path in logs:
        text = path.read_text(errors="replace")
        for k in keys:
            for enc in encodings(k):
                if enc in text:
                    found.append((path.name, enc[:12] + "..."))
    return found
