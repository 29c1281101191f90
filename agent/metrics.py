"""The agent's Prometheus metrics (``groupsec-agent run --metrics-port PORT``).

A collector that reads ``AgentSession.statistics()`` and the data path's ``statistics()``
when Prometheus scrapes; the per-packet loops only keep their plain-int counters, as before.
Served by ``groupsec.metrics.serve_metrics`` inside the agent's trio loop.

Labels stay low-cardinality: group, level, direction, drop reason, stage, and the SPI of each
SA currently installed (a handful per group; an SA's series ends when a rollover removes it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from groupsec.metrics import counter, gauge, make_registry

log = logging.getLogger("groupsec.agent.metrics")

DROP_REASONS = ("auth-failed", "replay", "unknown-spi", "malformed", "policy", "source-auth-failed", "sa-expired")
_SESSION = {  # session/member counter -> (metric, help)
    "registrations": ("groupsec_agent_registrations", "successful registrations with the controller"),
    "rekeys_applied": ("groupsec_agent_rekeys_accepted", "rekey messages verified and applied"),
    "heartbeats": ("groupsec_agent_heartbeats", "controller heartbeats accepted"),
    "resyncs_sent": ("groupsec_agent_resyncs_sent", "resync requests sent (missed rekeys)"),
    "acks_sent": ("groupsec_agent_acks_sent", "rekey acknowledgements sent"),
    "connects": ("groupsec_agent_connects", "TLS sessions established with the controller"),
    "connect_failures": ("groupsec_agent_connect_failures", "failed connection attempts"),
    "disconnects": ("groupsec_agent_disconnects", "sessions with the controller that ended"),
    "apply_errors": ("groupsec_agent_apply_errors", "data path installs that failed"),
    "rekey_datagrams": ("groupsec_agent_rekey_datagrams", "multicast rekey datagrams received"),
}


def _spi(v: Any) -> str:
    return f"{v:#010x}" if isinstance(v, int) else str(v)


class AgentCollector:
    def __init__(self, session: Any, datapath: Any) -> None:
        self.session = session
        self.datapath = datapath

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._session()
        try:
            dp = self.datapath.statistics()
        except Exception as exc:  # the session metrics are still worth serving
            log.warning("metrics: data path statistics failed: %s", exc)
            dp = {}
        if dp.get("datapath") == "xfrm":
            yield from self._xfrm(dp)
        else:
            yield from self._userspace(dp)

    # ---- session --------------------------------------------------------------------------

    def _session(self) -> Iterator[Metric]:
        st = self.session.statistics()
        yield gauge("groupsec_agent_connected", "1 while a TLS session with the controller is up",
                    int(bool(st.get("connected"))))
        yield gauge("groupsec_agent_registered", "1 while registered with the controller",
                    int(st.get("state") == "registered"))
        c = st.get("counters", {})
        for key, (name, doc) in _SESSION.items():
            yield counter(name, doc, c.get(key, 0))
        rej = counter("groupsec_agent_rekeys_rejected", "rekey messages rejected, by reason", labels=["reason"])
        for reason, v in sorted(st.get("rejected", {}).items()):
            rej.add_metric([reason], v)
        yield rej
        epoch = gauge("groupsec_agent_kek_epoch", "the KEK epoch held for the group", labels=["group", "level"])
        msg = gauge("groupsec_agent_msg_id", "the last rekey message ID applied", labels=["group", "level"])
        sas = gauge("groupsec_agent_sas_installed", "SAs installed in the data path", labels=["group", "level",
                                                                                              "direction"])
        for g in st.get("groups", []):
            gl = [g["group"], g["level"]]
            if g.get("kek_epoch") is not None:
                epoch.add_metric(gl, g["kek_epoch"])
            if g.get("msg_id") is not None:
                msg.add_metric(gl, g["msg_id"])
            for d in ("in", "out"):
                sas.add_metric([*gl, d], sum(1 for sa in g.get("sas", []) if sa["direction"] == d))
        yield from (epoch, msg, sas)

    # ---- the userspace data path -------------------------------------------------------------

    def _families(self) -> dict[str, Any]:
        gl = ["group", "level"]
        return {
            "packets": counter("groupsec_agent_packets", "packets protected (tx) and accepted (rx) by the group's "
                               "engine", labels=[*gl, "direction"]),
            "bytes": counter("groupsec_agent_bytes", "payload bytes protected (tx) and accepted (rx)",
                             labels=[*gl, "direction"]),
            "sa_packets": counter("groupsec_agent_sa_packets", "packets per installed SA",
                                  labels=[*gl, "spi", "direction"]),
            "sa_bytes": counter("groupsec_agent_sa_bytes", "bytes per installed SA", labels=[*gl, "spi", "direction"]),
            "drops": counter("groupsec_agent_drops", "packets dropped, by stage (engine, wire, relay, socket, tun, "
                             "raw, kernel) and reason", labels=[*gl, "stage", "reason"]),
            "replays": counter("groupsec_agent_replays", "packets dropped as replays", labels=gl),
            "auth": counter("groupsec_agent_auth_failures", "packets that failed authentication (ICV or source "
                            "signature)", labels=gl),
        }

    def _userspace(self, dp: dict[str, Any]) -> Iterator[Metric]:
        f = self._families()
        for st in (dp.get("groups") or {}).values():
            gl = [st["group"], st["level"]]
            f["packets"].add_metric([*gl, "tx"], st["tx_packets"])
            f["packets"].add_metric([*gl, "rx"], st["rx_packets"])
            f["bytes"].add_metric([*gl, "tx"], st["tx_bytes"])
            f["bytes"].add_metric([*gl, "rx"], st["rx_bytes"])
            for sa in st.get("sas", []):
                lab = [*gl, _spi(sa["spi"]), sa["direction"]]
                f["sa_packets"].add_metric(lab, sa["packets"])
                f["sa_bytes"].add_metric(lab, sa["bytes"])
            drops = {r: 0 for r in DROP_REASONS} | dict(st.get("drops", {}))
            for reason, v in sorted(drops.items()):
                f["drops"].add_metric([*gl, "engine", reason], v)
            f["replays"].add_metric(gl, drops["replay"])
            f["auth"].add_metric(gl, drops["auth-failed"] + drops["source-auth-failed"])
            parts = [("wire", st.get("wire_stats")), ("relay", st.get("relay")),
                     *[("socket", s) for s in st.get("sockets") or []]]
            for stage, part in parts:
                for reason, v in sorted(((part or {}).get("drops") or {}).items()):
                    f["drops"].add_metric([*gl, stage, reason], v)
        for stage in ("raw", "tun"):  # shared by every group of the data path
            for reason, v in sorted(((dp.get(stage) or {}).get("drops") or {}).items()):
                f["drops"].add_metric(["", "", stage, reason], v)
        yield from f.values()

    # ---- XFRM: the kernel's per-SA counters ------------------------------------------------

    def _xfrm(self, dp: dict[str, Any]) -> Iterator[Metric]:
        f = self._families()
        per: dict[tuple[str, str], dict[str, int]] = {}
        for sa in dp.get("sas", []):
            gl = [sa["group"], sa["level"]]
            lab = [*gl, _spi(sa["spi"]), sa["direction"]]
            f["sa_packets"].add_metric(lab, sa["packets"])
            f["sa_bytes"].add_metric(lab, sa["bytes"])
            t = per.setdefault((sa["group"], sa["level"]), {"tx": 0, "rx": 0, "txb": 0, "rxb": 0,
                                                             "replay": 0, "auth-failed": 0})
            d = "tx" if sa["direction"] == "out" else "rx"
            t[d] += sa["packets"]
            t[d + "b"] += sa["bytes"]
            for reason in ("replay", "auth-failed"):
                t[reason] += (sa.get("drops") or {}).get(reason, 0)
        for (g, lv), t in sorted(per.items()):
            # sums over the SAs installed now: an SA removed by a rollover takes its counts with it
            f["packets"].add_metric([g, lv, "tx"], t["tx"])
            f["packets"].add_metric([g, lv, "rx"], t["rx"])
            f["bytes"].add_metric([g, lv, "tx"], t["txb"])
            f["bytes"].add_metric([g, lv, "rx"], t["rxb"])
            for reason in ("replay", "auth-failed"):
                f["drops"].add_metric([g, lv, "kernel", reason], t[reason])
            f["replays"].add_metric([g, lv], t["replay"])
            f["auth"].add_metric([g, lv], t["auth-failed"])
        yield from f.values()
        kern = counter("groupsec_agent_kernel_xfrm_errors", "the kernel's /proc/net/xfrm_stat counters (all SAs)",
                       labels=["stat"])
        for name, v in sorted((dp.get("kernel") or {}).items()):
            if isinstance(v, int):
                kern.add_metric([name], v)
        yield kern


def agent_registry(session: Any, datapath: Any) -> CollectorRegistry:
    return make_registry(AgentCollector(session, datapath))
