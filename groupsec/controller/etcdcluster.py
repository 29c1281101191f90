"""A throw-away N-node etcd cluster on loopback (tests, ``groupsec bench failover``).

    with LocalEtcdCluster(3, workdir) as cluster:
        cluster.url          # "etcd://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        cluster.stop(1)      # SIGKILL one member; cluster.start(1) brings it back

Uses Debian's ``etcd-server`` (/usr/bin/etcd, or $GROUPSEC_ETCD). Free ports, its own data
directories, every process killed at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from groupsec.controller.etcd import EtcdClient, EtcdError
from groupsec.errors import ConfigError


def etcd_binary() -> str | None:
    return os.environ.get("GROUPSEC_ETCD") or shutil.which("etcd") or (
        "/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalEtcdCluster:
    def __init__(self, n: int, workdir: str | os.PathLike[str], token: str = "groupsec-test") -> None:
        binary = etcd_binary()
        if binary is None:
            raise ConfigError("etcd is not installed (Debian: apt-get install etcd-server)")
        self.binary = binary
        self.n = n
        self.dir = Path(workdir)
        self.token = f"{token}-{os.getpid()}-{time.monotonic_ns()}"
        ports = _free_ports(2 * n)
        self.client_ports, self.peer_ports = ports[:n], ports[n:]
        self.names = [f"etcd{i}" for i in range(n)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.client_ports]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def _cmd(self, i: int) -> list[str]:
        peers = ",".join(f"{nm}=http://127.0.0.1:{p}" for nm, p in zip(self.names, self.peer_ports, strict=True))
        return [self.binary, "--name", self.names[i], "--data-dir", str(self.dir / self.names[i]),
                "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-cluster", peers, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new", "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-level", "error", "--logger", "zap"]

    def start(self, i: int | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for j in range(self.n) if i is None else [i]:
            if self.procs[j] is None:
                log = open(self.dir / f"{self.names[j]}.log", "ab")
                self.procs[j] = subprocess.Popen(self._cmd(j), stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
                log.close()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        c = EtcdClient(self.endpoints, timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    c.put("/groupsec-health", b"ok")
                    return
                except EtcdError as exc:
                    if time.monotonic() > deadline:
                        raise ConfigError(f"etcd cluster did not become healthy: {exc}") from None
                    for j, p in enumerate(self.procs):
                        if p is not None and p.poll() is not None:
                            tail = (self.dir / f"{self.names[j]}.log").read_text(errors="replace")[-1500:]
                            raise ConfigError(f"etcd {self.names[j]} exited ({p.returncode}): {tail}") from None
                    time.sleep(0.1)
        finally:
            c.close()

    def stop(self, i: int) -> None:
        p = self.procs[i]
        if p is not None:
            p.kill()
            p.wait(10)
            self.procs[i] = None

    def close(self) -> None:
        for i in range(self.n):
            self.stop(i)

    def __enter__(self) -> LocalEtcdCluster:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
