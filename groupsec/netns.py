"""Network namespaces for the lab (and the end-to-end tests): a LAN of namespaces on one Linux
bridge, processes inside them, and sockets opened inside them from this process.

    with Lan() as lan:                          # a hub namespace holding bridge br0
        a = lan.add("a")                        # namespace with eth0 = 10.x.y.1/24 on the bridge
        p = a.popen(sys.executable, "-m", "...")
        with a.entered():                       # sockets made here live in namespace a
            s = socket.socket(...)

This is orchestration (like ``groupsec demo``), so it drives iproute2's ``ip`` as a
subprocess. The bridge has multicast snooping off, so every port (an eavesdropper's too)
sees all multicast. Names are random so that concurrent runs do not collide; everything is
deleted on close (deleting a namespace deletes its veth end, and the hub its bridge).
Needs CAP_NET_ADMIN (:func:`missing_privilege` says why not).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from groupsec.errors import ConfigError

CAP_NET_ADMIN = 12
CLONE_NEWNET = 0x40000000
# The package's parent directory, so that `python -m groupsec...` / `-m agent...` started inside a
# namespace import this checkout (harmless when installed).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    pp = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT) + (os.pathsep + pp if pp else "")}


def has_capability(cap: int) -> bool:
    """True when this process has ``cap`` in its effective set (from /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def missing_privilege() -> str | None:
    """A one-line reason why namespaces cannot be made here, or None."""
    if not has_capability(CAP_NET_ADMIN):
        return "needs root (CAP_NET_ADMIN) to create network namespaces and a bridge; run it with sudo"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    return None


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=timeout)
    if check and p.returncode != 0:
        raise ConfigError(f"`{' '.join(args)}` failed: {p.stderr.strip()}")
    return p


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Netns:
    def __init__(self, name: str, address: str | None = None) -> None:
        self.name = name
        self.address = address  # eth0's address, when on a Lan
        self.procs: list[subprocess.Popen[Any]] = []
        sh("ip", "netns", "add", name)
        try:
            self.ip("link", "set", "lo", "up")
        except ConfigError:
            sh("ip", "netns", "del", name, check=False)
            raise

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "-n", self.name, *args, check=check)

    def command(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.command(*cmd), capture_output=True, text=True, env=child_env(), timeout=timeout,
                           check=False)
        if check and p.returncode != 0:
            raise ConfigError(f"[{self.name}] {' '.join(cmd)}: {p.stderr.strip()[-2000:]}")
        return p

    def popen(self, *cmd: str, stdin: bool = True) -> subprocess.Popen[str]:
        """A process in the namespace with text pipes (killed and reaped on close)."""
        p = subprocess.Popen(self.command(*cmd), env=child_env(), text=True,
                             stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def python(self, *args: str) -> subprocess.Popen[str]:
        return self.popen(sys.executable, *args)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block with this thread in the namespace (sockets made there stay in it)."""
        with open(f"/proc/{os.getpid()}/task/{_gettid()}/ns/net", "rb") as home, \
                open(f"/run/netns/{self.name}", "rb") as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        sh("ip", "netns", "del", self.name, check=False)


def _gettid() -> int:
    return int(getattr(os, "gettid", os.getpid)())


class Lan:
    """A hub namespace with a bridge, and member namespaces attached to it by veth pairs."""

    def __init__(self, prefix: str | None = None, tag: str = "gs") -> None:
        self.tag = tag + os.urandom(3).hex()
        b = os.urandom(2)
        self.prefix = prefix or f"10.{200 + b[0] % 50}.{b[1]}"
        self.members: list[Netns] = []
        self.hub = Netns(f"{self.tag}-hub")
        try:
            self.hub.ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            self.hub.ip("link", "set", "br0", "up")
        except BaseException:
            self.hub.close()
            raise

    def add(self, role: str) -> Netns:
        i = len(self.members) + 1
        ns = Netns(f"{self.tag}-{role}", f"{self.prefix}.{i}")
        self.members.append(ns)
        self.hub.ip("link", "add", f"h{i}", "type", "veth", "peer", "name", f"m{i}", "netns", ns.name)
        self.hub.ip("link", "set", f"h{i}", "master", "br0", "up")
        ns.ip("link", "set", f"m{i}", "name", "eth0")
        ns.ip("addr", "add", f"{ns.address}/24", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        return ns

    def close(self) -> None:
        for ns in [*self.members, self.hub]:
            ns.close()

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
