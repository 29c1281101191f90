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


def render(doc: dict[str, Any]) -> str:
    a = doc["agent"]
    age = time.time() - float(doc.get("written", 0))
    lines = [f"member {a.get('member')}  state {a.get('state')}  controller {a.get('controller')} "
             f"({'connected' if a.get('connected') else 'disconnected'})  "
             f"{'running' if doc.get('running') else 'NOT RUNNING'} (status {age:.0f}s old)"]
    if a.get("last_error"):
        lines.append(f"last error: {a['last_error']}")
    for g in a.get("groups", []):
        name = f"{g['group']}/{g['level']}" if g.get("level") else g["group"]
        sid = f"  sender id {g['sender_id']}" if g.get("sender_id") is not None else ""
        lines.append(f"group {name}  {g.get('role')}  dst {g.get('dst')}  msg_id {g.get('msg_id')}  "
                     f"KEK epoch {g.get('kek_epoch')}{sid}")
        lines.append(f"  {'SPI':<12}{'dir':<5}{'sender':<16}expires in")
        for sa in g.get("sas", []):
            exp = sa.get("expires_in")
            lines.append(f"  {sa['spi']:<12}{sa['direction']:<5}{sa['sender']:<16}"
                         f"{'-' if exp is None else f'{exp:.1f}s'}")
    c = a.get("counters", {})
    lines.append("counters: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    rej = a.get("rejected", {})
    lines.append("rekeys rejected: " + (", ".join(f"{k} {v}" for k, v in sorted(rej.items())) or "none"))
    dp = doc.get("datapath") or {}
    tot = dp.get("totals")
    if isinstance(tot, dict):
        lines.append(f"data path {dp.get('datapath')}: " + ", ".join(f"{k} {v}" for k, v in tot.items()))
    for name, gs in (dp.get("groups") or {}).items() if isinstance(dp.get("groups"), dict) else []:
        drops = gs.get("drops") if isinstance(gs, dict) else None
        if drops:
            lines.append(f"  {name} drops: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    doc = read_status(_state_dir(args))
    print(json.dumps(doc, indent=1) if args.json else render(doc))
    return 0 if doc["running"] else 1
