"""Prometheus metrics: the HTTP exporter (a small trio server) and the controller's collector.

Nothing here counts anything. Each process has its own ``CollectorRegistry`` holding one
collector that reads the objects' existing counters (``app.counters``, ``statistics()``) when
Prometheus scrapes, so no hot path pays for metrics. The exporter runs inside the process's
trio loop (no thread), so a scrape reads the counters between two trio steps and never sees
a dict in the middle of a change.

    groupsec serve --metrics-port 9464 [--metrics-addr 127.0.0.1]
    curl http://127.0.0.1:9464/metrics

The agent's collector is ``agent.metrics.AgentCollector``; both use :func:`serve_metrics`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("groupsec.metrics")

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
MAX_SCRAPERS = 8


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics over HTTP on this port (/metrics; 0: any free port)")
    parser.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                        help="address the metrics exporter listens on (default 127.0.0.1)")


def make_registry(*collectors: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    return reg


# ---- the exporter ----------------------------------------------------------------------------

def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8", head: bool = False) -> bytes:
    hdr = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
           "Connection: close\r\n\r\n").encode()
    return hdr if head else hdr + body


def handle_request_untrusted(request: bytes, registry: CollectorRegistry) -> bytes:
    """The reply to one HTTP request head (bytes up to the blank line)."""
    line = request.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"GET only\n")
    if target not in ("/metrics", "/"):
        return _response("404 Not Found", b"try /metrics\n")
    return _response("200 OK", generate_latest(registry), CONTENT_TYPE_LATEST, head=method == "HEAD")


async def serve_metrics(registry: CollectorRegistry, host: str, port: int, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``registry`` at http://HOST:PORT/metrics; ``task_status.started(bound_port)``."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    limiter = trio.CapacityLimiter(MAX_SCRAPERS)

    async def handle(stream: trio.SocketStream) -> None:
        if limiter.available_tokens == 0:  # busy: refuse rather than queue
            await trio.aclose_forcefully(stream)
            return
        async with limiter, stream:
            buf = b""
            with trio.move_on_after(REQUEST_TIMEOUT):
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_REQUEST:
                        await stream.send_all(_response("431 Request Header Fields Too Large", b"too large\n"))
                        return
                try:
                    reply = handle_request_untrusted(buf, registry)
                except Exception:  # a collector bug must not take the exporter (or the process) down
                    log.exception("metrics collection failed")
                    reply = _response("500 Internal Server Error", b"collection failed\n")
                try:
                    await stream.send_all(reply)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    log.info("metrics on http://%s:%d/metrics", host, bound)
    task_status.started(bound)
    await trio.serve_listeners(handle, listeners)


# ---- building metric families ----------------------------------------------------------------

def counter(name: str, doc: str, value: float | None = None, labels: Iterable[str] = ()) -> CounterMetricFamily:
    labels = list(labels)
    return CounterMetricFamily(name, doc, value=value if not labels else None, labels=labels or None)


def gauge(name: str, doc: str, value: float | None = None, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    labels = list(labels)
    return GaugeMetricFamily(name, doc, value=value if not labels else None, labels=labels or None)


# ---- the controller --------------------------------------------------------------------------

REFUSAL_CODES = ("not-authorized", "revoked", "unknown-group", "bad-message")
REKEY_KINDS = ("rekey", "lkh")
ROLLOVER_REASONS = ("scheduled", "kek-scheduled", "operator", "eviction")
_NAMED = {  # app.counters key -> (metric, help)
    "acks": ("groupsec_controller_acks", "rekey acknowledgements received from members"),
    "resyncs": ("groupsec_controller_resyncs", "resync requests answered with a fresh grant"),
    "heartbeats": ("groupsec_controller_heartbeats", "heartbeats sent (one per level per interval)"),
    "evictions": ("groupsec_controller_evictions", "member evictions (revocations and lost levels)"),
    "multicast-sent": ("groupsec_controller_multicast_datagrams_sent", "rekey/heartbeat datagrams multicast"),
    "multicast-errors": ("groupsec_controller_multicast_errors", "multicast sends that failed (members resync)"),
    "connection-lost": ("groupsec_controller_connections_lost", "sessions that ended with a broken connection"),
    "handshake-timeout": ("groupsec_controller_handshake_timeouts", "TLS handshakes that timed out"),
    "internal-errors": ("groupsec_controller_internal_errors", "session handler failures (bugs)"),
    "scheduler-errors": ("groupsec_controller_scheduler_errors", "rekey scheduler rounds that failed"),
    "admin-refused": ("groupsec_controller_admin_refused", "admin socket connections from another uid"),
}


class ControllerCollector:
    """Reads a ``ControllerApp`` (and optionally its ``ControllerServer``) at scrape time."""

    def __init__(self, app: Any, server: Any = None) -> None:
        self.app = app
        self.server = server

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        app = self.app
        c = dict(app.counters)
        yield counter("groupsec_controller_registrations", "registrations accepted", c.get("registrations", 0))
        refused = counter("groupsec_controller_registrations_refused", "registrations refused, by error code",
                          labels=["code"])
        codes = {code: 0 for code in REFUSAL_CODES}
        for k, v in c.items():
            if k.startswith("refused-") and k != "refused-too-many-connections":
                codes[k[len("refused-"):]] = v
        for code, v in sorted(codes.items()):
            refused.add_metric([code], v)
        yield refused
        yield counter("groupsec_controller_connections_refused", "connections refused at max_connections",
                      c.get("refused-too-many-connections", 0))
        sent = counter("groupsec_controller_rekeys_sent", "signed rekey messages sent (multicast and to every "
                       "session), by kind: rekey (TEKs) or lkh (key-tree update); resends included", labels=["kind"])
        kinds = {k: 0 for k in REKEY_KINDS}
        kinds.update({k[len("rekeys-kind-"):]: v for k, v in c.items() if k.startswith("rekeys-kind-")})
        for kind, v in sorted(kinds.items()):
            sent.add_metric([kind], v)
        yield sent
        yield counter("groupsec_controller_rekeys_resent", "rekeys resent unchanged at start-up (the last of each "
                      "level: a crash mid-rekey resumes)", c.get("rekeys-resent", 0))
        roll = counter("groupsec_controller_rollovers", "TEK rollovers, by reason", labels=["reason"])
        mc = dict(getattr(app.manager, "counters", {}))
        reasons = {r: 0 for r in ROLLOVER_REASONS}
        reasons.update({k[len("rollover-"):]: v for k, v in mc.items() if k.startswith("rollover-")})
        for r, v in sorted(reasons.items()):
            roll.add_metric([r], v)
        yield roll
        for key, (name, doc) in _NAMED.items():
            yield counter(name, doc, c.get(key, 0))
        tls = counter("groupsec_controller_tls_failures", "TLS handshakes that failed, by reason", labels=["reason"])
        errs = counter("groupsec_controller_session_errors", "sessions closed with a protocol error, by code",
                       labels=["code"])
        for k, v in sorted(c.items()):
            if k.startswith("tls-"):
                tls.add_metric([k[4:]], v)
            elif k.startswith("error-"):
                errs.add_metric([k[6:]], v)
        yield tls
        yield errs
        yield gauge("groupsec_controller_sessions", "registered sessions now",
                    sum(len(s) for s in app.sessions.values()))
        if self.server is not None:
            yield gauge("groupsec_controller_connections", "open TCP/TLS connections now", self.server.active)
        yield from self._levels()

    def _levels(self) -> Iterator[Metric]:
        app = self.app
        try:
            status = app.status()
        except Exception as exc:  # no level state yet (an HA follower before it loaded): counters only
            log.debug("metrics: no level status: %s", exc)
            return
        members = gauge("groupsec_controller_members", "members authorized for the level (not revoked)",
                        labels=["group", "level"])
        lagging = gauge("groupsec_controller_members_lagging", "authorized members whose last acknowledgement is "
                        "older than the level's current message ID or KEK epoch", labels=["group", "level"])
        connected = gauge("groupsec_controller_members_connected", "members with a registered session on the level",
                          labels=["group", "level"])
        msg_id = gauge("groupsec_controller_msg_id", "the level's current rekey message ID", labels=["group", "level"])
        epoch = gauge("groupsec_controller_kek_epoch", "the level's current KEK epoch", labels=["group", "level"])
        counts: dict[tuple[str, str], list[int]] = {}
        for lv in status["levels"]:
            key = (lv["group"], lv["level"])
            counts[key] = [0, 0]
            msg_id.add_metric(list(key), lv["msg_id"])
            epoch.add_metric(list(key), lv["kek_epoch"])
        for m in status["members"]:
            if m["revoked"]:
                continue
            for lv in m["levels"]:
                n = counts.setdefault((lv["group"], lv["level"]), [0, 0])
                n[0] += 1
                n[1] += bool(lv["lagging"])
        for key, (total, lag) in sorted(counts.items()):
            members.add_metric(list(key), total)
            lagging.add_metric(list(key), lag)
            connected.add_metric(list(key), len({h.session.identity for h in app.level_handles(key)}))
        yield from (members, lagging, connected, msg_id, epoch)
