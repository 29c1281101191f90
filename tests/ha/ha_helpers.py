"""Three `groupsec serve` processes on one real etcd cluster, plus the e2e agent helpers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from agent_helpers import ENV, GroupDef, run_cli, wait_for

from groupsec.controller.etcd import EtcdClient
from groupsec.controller.etcdstore import LEADER_KEY


class HAControllers:
    def __init__(self, tmp: Path, etcd_url: str, groups: list[GroupDef], n: int = 3, *, heartbeat: float = 1.0,
                 ttl: int = 2) -> None:
        self.tmp, self.url, self.ttl = tmp, etcd_url, ttl
        self.ca_home = tmp / "ca"
        run_cli("init", str(self.ca_home))
        cfg = ("[controller]\n"
               f'state = "{etcd_url}"\n'
               f"heartbeat_interval = {heartbeat}\n"
               'rekey_interface = "lo"\nrekey_ttl = 4\nadvertise = false\n\n' + "\n".join(g.toml() for g in groups))
        (self.ca_home / "groupsec.toml").write_text(cfg)
        self.names = [f"ctl-{i}" for i in range(n)]
        self.homes = []
        for name in self.names:
            home = tmp / name
            run_cli("controller", "add", name, "--out", str(home), "-d", str(self.ca_home))
            self.homes.append(home)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.ports: list[int | None] = [None] * n
        self.etcd = EtcdClient([(h, int(p)) for h, p in (x.rsplit(":", 1) for x in etcd_url[7:].split(","))])

    def add_member(self, name: str, *specs: str) -> Path:
        out = self.tmp / f"{name}.bundle"
        run_cli("member", "add", name, *[a for s in specs for a in ("--group", s)], "-d", str(self.ca_home),
                "--out", str(out))
        return out

    def start(self, i: int) -> int:
        pf = self.tmp / f"{self.names[i]}.port"
        pf.unlink(missing_ok=True)
        listen = f"127.0.0.1:{self.ports[i] or 0}"
        cmd = [sys.executable, "-m", "groupsec.cli", "serve", "-d", str(self.homes[i]), "--store", self.url,
               "--name", self.names[i], "--lease-ttl", str(self.ttl), "--listen", listen, "--no-advertise",
               "--port-file", str(pf), "-v"]
        with open(self.tmp / f"{self.names[i]}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: pf.exists() and pf.read_text().strip(), 20, f"{self.names[i]}'s port file")
        self.ports[i] = int(pf.read_text().strip())
        return self.ports[i]  # type: ignore[return-value]

    def start_all(self) -> str:
        for i in range(len(self.names)):
            self.start(i)
        self.wait_leader()
        return self.agent_url

    @property
    def agent_url(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def leader(self) -> str | None:
        kv = self.etcd.get(LEADER_KEY)
        return json.loads(kv.value)["name"] if kv else None

    def wait_leader(self, not_: str | None = None, timeout: float = 15) -> str:
        return wait_for(lambda: (lambda n: n if n and n != not_ else None)(self.leader()), timeout,  # type: ignore[no-any-return]
                        "a leader", interval=0.02)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def signal(self, name: str, sig: int) -> None:
        p = self.procs[self.index(name)]
        assert p is not None
        p.send_signal(sig)
        if sig == signal.SIGKILL:
            p.wait(10)
            self.procs[self.index(name)] = None

    def cli(self, i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "-d", str(self.homes[i]), check=check)

    def status(self, i: int) -> dict[str, Any]:
        return json.loads(self.cli(i, "status", "--json").stdout)  # type: ignore[no-any-return]

    def log_text(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None:
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)
                    p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
                self.procs[i] = None
        self.etcd.close()


def level_state(etcd_url: str, home: Path, group: str, level: str = "") -> dict[str, Any]:
    from groupsec.controller.ha import open_etcd_store

    s = open_etcd_store(home, etcd_url)
    try:
        return s.get(f"level/{group}/{level}")  # type: ignore[no-any-return]
    finally:
        s.close()


__all__ = ["HAControllers", "level_state", "time"]
