"""``groupsec-agent status [--json]``: what the running agent holds.

Reads ``STATE_DIR/status.json``, which ``groupsec-agent run`` rewrites on every change and
at least every ``session.status_interval`` seconds: groups, installed SAs (SPI, direction,
sender, seconds to expiry), and counters (session, rekey rejections by reason, data path).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from groupsec.errors import ConfigError

STALE_AFTER = 30.0


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="show the running agent's groups, SAs and counters",
                       description="Show the running agent's groups, installed SAs and counters.")
    p.add_argument("--config", metavar="FILE", help="agent.toml (to find state_dir)")
    p.add_argument("--state-dir", metavar="DIR", help="the agent's state directory")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.set_defaults(func=main)


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir)
    if args.config:
        from agent.config import DEFAULT_STATE_DIR, load_toml

        d = load_toml(args.config)
        sd = d.get("state_dir", DEFAULT_STATE_DIR)
        if not isinstance(sd, str):
            raise ConfigError(f"{args.config}: state_dir: must be a string")
        return (Path(args.config).resolve().parent / sd) if not os.path.isabs(sd) else Path(sd)
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/run") / "groupsec-agent"


def read_status(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "status.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no status file (is `groupsec-agent run` running with this state dir?)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable status file: {exc}") from None
    if not isinstance(doc, dict) or "agent" not in doc:
        raise ConfigError(f"{path}: not an agent status file")
    alive = True
    try:
        os.kill(int(doc.get("pid", 0)), 0)
    except (OSError, ValueError):
        alive = False
    doc["running"] = alive and time.time() - float(doc.get("written", 0)) < STALE_AFTER
    return doc


def _spi(v: Any) -> int | None:
    try:
        return v if isinstance(v, int) else int(str(v), 0)
    except ValueError:
        return None


def _dp_sas(doc: dict[str, Any], name: str) -> dict[tuple[int, str | None], dict[str, Any]]:
    """The data path's per-SA counters of group ``name``, by (SPI, direction); direction None
    where the data path does not give one (empty where it has no per-SA counters)."""
    groups = (doc.get("datapath") or {}).get("groups")
    g = groups.get(name) if isinstance(groups, dict) else None
    sas = g.get("sas") if isinstance(g, dict) else None
    out: dict[tuple[int, str | None], dict[str, Any]] = {}
    for sa in sas if isinstance(sas, list) else []:
        spi = _spi(sa.get("spi")) if isinstance(sa, dict) else None
        if spi is not None:
            out[(spi, sa.get("direction"))] = sa  # None: a data path that does not say
    return out


def tables(doc: dict[str, Any], now: float | None = None) -> list[Any]:
    """The human form as rich renderables, in print order: the agent, one table of installed SAs
    per group (SPI, direction, sender, expiry, packets, bytes, drops), the counters."""
    from rich.table import Table
    from rich.text import Text

    a = doc["agent"]
    age = (time.time() if now is None else now) - float(doc.get("written", 0))
    out: list[Any] = [Text(f"member {a.get('member')}  state {a.get('state')}  controller {a.get('controller')} "
                           f"({'connected' if a.get('connected') else 'disconnected'})  "
                           f"{'running' if doc.get('running') else 'NOT RUNNING'} (status {age:.0f}s old)",
                           style="bold" if doc.get("running") else "bold red")]
    if a.get("last_error"):
        out.append(Text(f"last error: {a['last_error']}", style="red"))
    for g in a.get("groups", []):
        name = f"{g['group']}/{g['level']}" if g.get("level") else g["group"]
        sid = f"  sender id {g['sender_id']}" if g.get("sender_id") is not None else ""
        out.append(Text(f"group {name}  {g.get('role')}  dst {g.get('dst')}  msg_id {g.get('msg_id')}  "
                        f"KEK epoch {g.get('kek_epoch')}{sid}"))
        counters = _dp_sas(doc, name)
        t = Table()
        for col in ("SPI", "dir", "sender", "expires in", "packets", "bytes", "drops"):
            t.add_column(col, no_wrap=True, justify="right" if col in ("expires in", "packets", "bytes") else "left")
        for sa in g.get("sas", []):
            exp = sa.get("expires_in")
            spi = _spi(sa.get("spi"))
            c = (counters.get((spi, sa["direction"])) or counters.get((spi, None)) or {}) if spi is not None else {}
            drops = c.get("drops") if isinstance(c.get("drops"), dict) else {}
            t.add_row(str(sa["spi"]), Text(sa["direction"], style="cyan" if sa["direction"] == "out" else ""),
                      str(sa.get("sender") or "-"), "-" if exp is None else f"{exp:.1f}s",
                      str(c.get("packets", "-")), str(c.get("bytes", "-")),
                      " ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "-")
        out.append(t)
    t = Table(title="counters", title_justify="left")
    t.add_column("counter", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    for k, v in sorted(a.get("counters", {}).items()):
        t.add_row(k, str(v))
    for k, v in sorted(a.get("rejected", {}).items()):
        t.add_row(f"rekeys rejected: {k}", str(v))
    dp = doc.get("datapath") or {}
    tot = dp.get("totals")
    if isinstance(tot, dict):
        for k, v in tot.items():
            t.add_row(f"data path {dp.get('datapath')}: {k}", str(v))
    for name, gs in (dp.get("groups") or {}).items() if isinstance(dp.get("groups"), dict) else []:
        drops = gs.get("drops") if isinstance(gs, dict) else None
        for k, v in sorted((drops or {}).items()):
            t.add_row(f"{name} drops: {k}", str(v))
    out.append(t)
    return out


def render(doc: dict[str, Any], width: int = 160) -> str:
    """The human form as plain text (the tables without colour)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None)
    for r in tables(doc):
        console.print(r)
    return buf.getvalue()


def main(args: argparse.Namespace) -> int:
    doc = read_status(_state_dir(args))
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        import sys

        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() else 160)
        for r in tables(doc):
            console.print(r)
    return 0 if doc["running"] else 1
