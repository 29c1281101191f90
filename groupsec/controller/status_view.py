"""The human form of ``groupsec status``: rich tables built from the status document (the same
document ``--json`` prints unchanged).

* the cluster (HA mode): every controller, its address, leader or follower, and its lag;
* the groups and levels: message ID, KEK epoch, senders, and each generation's SPIs with its
  activation window;
* the members: one row per member and group/level, with the KEK epoch and message ID of its
  last acknowledgement, when that was, whether it lags, and its open sessions.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "never"


def tables(status: dict[str, Any], now: float | None = None) -> list[Any]:
    """The renderables, in print order (a heading line, then the tables)."""
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    out: list[Any] = [Text(f"controller: {'running' if status.get('running') else 'not running'}, "
                           f"{status.get('sessions', 0)} session(s)",
                           style="bold" if status.get("running") else "bold red")]
    ha = status.get("ha")
    if ha:
        t = Table(title=f"cluster: this is {ha.get('controller')}, leader {ha.get('leader') or 'none'}, "
                  f"lease TTL {ha.get('lease_ttl')} s, etcd revision {ha.get('etcd_revision')}", title_justify="left")
        for col in ("controller", "address", "role", "lag (revisions)", "lag (s)"):
            t.add_column(col, no_wrap=True, justify="right" if col.startswith("lag") else "left")
        for c in ha.get("controllers", []):
            t.add_row(c["name"], c.get("addr") or "-",
                      Text("LEADER", style="bold green") if c.get("leader") else Text("follower"),
                      str(c.get("lag_revisions")), f"{float(c.get('lag_s') or 0):.1f}")
        out.append(t)
    t = Table(title="groups", title_justify="left")
    for col in ("group/level", "msg_id", "KEK epoch", "senders", "gen", "SPIs", "active"):
        t.add_column(col, no_wrap=True, justify="right" if col in ("msg_id", "KEK epoch", "senders", "gen") else "left")
    for lv in status.get("levels", []):
        name = f"{lv['group']}/{lv['level'] or '-'}"
        gens = lv.get("generations") or [{}]
        for i, g in enumerate(gens):
            spis = " ".join(f"{s:#010x}" for s in g.get("spis", []))
            head = (name, str(lv["msg_id"]), str(lv["kek_epoch"]), str(lv["senders"])) if i == 0 else ("",) * 4
            t.add_row(*head, str(g.get("gen", "-")), spis or "-", _window(g, now))
    out.append(t)
    t = Table(title="members", title_justify="left")
    for col in ("member", "group/level", "epoch", "msg_id", "last ack", "state", "connected"):
        t.add_column(col, no_wrap=True, justify="right" if col in ("epoch", "msg_id", "connected") else "left")
    for m in status.get("members", []):
        levels = m.get("levels") or [{"group": "-", "level": "", "epoch": None, "msg_id": None, "last_ack": None,
                                      "lagging": False}]
        for i, lv in enumerate(levels):
            if m.get("revoked"):
                state = Text("revoked", style="dim")
            elif lv.get("lagging"):
                state = Text("LAGGING", style="bold yellow")
            else:
                state = Text("ok", style="green")
            t.add_row(m["name"] if i == 0 else "", f"{lv['group']}/{lv['level'] or '-'}",
                      "-" if lv.get("epoch") is None else str(lv["epoch"]),
                      "-" if lv.get("msg_id") is None else str(lv["msg_id"]), _when(lv.get("last_ack")), state,
                      (str(m.get("connected", 0)) if i == 0 else ""))
    out.append(t)
    return out


def _window(g: dict[str, Any], now: float) -> str:
    a, d = g.get("activate_at"), g.get("deactivate_at")
    if a is None:
        return "-"
    if now < float(a):
        return f"in {float(a) - now:.0f}s"
    if d is not None and now >= float(d):
        return "retired"
    return "now" + (f" (until +{float(d) - now:.0f}s)" if d is not None else "")


def print_status(status: dict[str, Any], file: IO[str] | None = None) -> None:
    from rich.console import Console

    out = file or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 160)
    for r in tables(status):
        console.print(r)
