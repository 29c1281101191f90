"""The rekey scheduler: TEK rollovers before expiry (ATD/DTD), KEK rollovers, heartbeats.

One task loops over the configured levels. Times are controller wall-clock seconds from
``app.clock`` (tests pass ``trio.current_time`` with a MockClock). Every rollover is made
durable by the group manager before ``send_plan`` signs and sends it.
"""

from __future__ import annotations

import logging

import trio

from groupsec.controller.app import ControllerApp

log = logging.getLogger("groupsec.controller.rekey")


class RekeyScheduler:
    def __init__(self, app: ControllerApp, heartbeat_interval: float | None = None) -> None:
        self.app = app
        self.heartbeat_interval = heartbeat_interval or app.config.controller.heartbeat_interval
        self._next_hb: dict[tuple[str, str], float] = {}

    def due(self, now: float) -> float:
        """Run everything due at ``now``; return the time of the next event."""
        app, mgr = self.app, self.app.manager
        if not app.is_leader():  # HA follower: the leader rolls keys over and sends heartbeats
            self._next_hb.clear()
            return now + 0.2
        nxt = now + self.heartbeat_interval
        for lc in app.config.levels.values():
            kek_at = mgr.next_kek_rollover_at(lc)
            tek_at = mgr.next_rollover_at(lc)
            if kek_at <= now:
                app.send_plan(mgr.rollover(lc, now, new_kek_inline=True, reason="kek-scheduled"))
                self._next_hb[lc.key] = now + self.heartbeat_interval
            elif tek_at <= now:
                app.send_plan(mgr.rollover(lc, now, reason="scheduled"))
                self._next_hb[lc.key] = now + self.heartbeat_interval
            hb = self._next_hb.get(lc.key, now)
            if hb <= now:
                app.heartbeat(lc)
                hb = self._next_hb[lc.key] = now + self.heartbeat_interval
            nxt = min(nxt, hb, mgr.next_kek_rollover_at(lc), mgr.next_rollover_at(lc))
        return nxt

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            now = self.app.clock()
            try:
                nxt = self.due(now)
            except Exception:  # a rekey failure must not kill the controller; retried next round
                log.exception("rekey scheduler round failed")
                self.app.count("scheduler-errors")
                nxt = now + 1.0
            await trio.sleep(max(0.01, nxt - self.app.clock()))
