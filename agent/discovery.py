"""Controller discovery over zeroconf (the ONLY zeroconf module on the agent side).

python-zeroconf runs its own thread and event loop: its synchronous API (``Zeroconf``,
``ServiceBrowser``, ``ServiceInfo.request``) is called inside ``trio.to_thread.run_sync``,
and each controller found comes back into trio through a memory channel.

Discovery never replaces authentication: a candidate is kept only if its TXT record's
``ca`` fingerprint equals the SHA-256 of our bundle's CA certificate (so we do not even
try a foreign controller), and the TLS handshake still verifies the controller's
certificate against that CA (serverAuth EKU, our CA as the only anchor).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Any

import trio

log = logging.getLogger("groupsec.agent.discovery")
SERVICE = "_groupsec._tcp.local."
SUPPORTED_VERSIONS = ("1",)


def _txt(props: dict[Any, Any], key: str) -> str | None:
    for k, v in props.items():
        kk = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
        if kk == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else (None if v is None else str(v))
    return None


def accept(props: dict[Any, Any], ca_fingerprint: str) -> str | None:
    """None if the TXT record fits us, else why not (pure; unit-tested)."""
    version = _txt(props, "version")
    if version not in SUPPORTED_VERSIONS:
        return f"protocol version {version!r} is not supported"
    ca = _txt(props, "ca") or ""
    if not hmac.compare_digest(ca.lower().encode(), ca_fingerprint.lower().encode()):
        return "CA fingerprint differs from our bundle's CA"
    return None


async def browse(send: trio.MemorySendChannel[tuple[str, int]], ca_fingerprint: str, duration: float) -> None:
    """Browse for ``duration`` seconds; send (address, port) of every matching controller."""
    token = trio.lowlevel.current_trio_token()

    def run() -> None:
        from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

        zc = Zeroconf()
        seen: set[tuple[str, int]] = set()

        def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            if state_change is not ServiceStateChange.Added and state_change is not ServiceStateChange.Updated:
                return
            info = ServiceInfo(service_type, name)
            if not info.request(zeroconf, 3000):
                return
            why = accept(info.properties or {}, ca_fingerprint)
            if why is not None:
                log.info("ignoring %s: %s", name, why)
                return
            for raw in info.addresses:
                try:
                    addr = str(ipaddress.ip_address(raw))
                except ValueError:
                    continue
                item = (addr, int(info.port or 0))
                if item in seen or not item[1]:
                    continue
                seen.add(item)
                try:
                    trio.from_thread.run(send.send, item, trio_token=token)
                except (trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled):
                    return

        browser = ServiceBrowser(zc, SERVICE, handlers=[on_change])
        try:
            stop.wait(duration)
        finally:
            browser.cancel()
            zc.close()

    import threading

    stop = threading.Event()
    try:
        async with send:
            await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    finally:
        stop.set()  # an abandoned thread stops browsing and closes zeroconf by itself


async def discover(ca_fingerprint: str, wait: float = 10.0, *, first_wait: float = 1.0
                   ) -> list[tuple[str, int, str | None]]:
    """Controllers that advertise our CA: [(address, port, None)] (None: no TLS host name to
    check; the CA and the serverAuth EKU authenticate). Returns once one is found (plus
    ``first_wait`` seconds to collect others) or after ``wait`` seconds."""
    send, recv = trio.open_memory_channel[tuple[str, int]](64)
    found: list[tuple[str, int, str | None]] = []
    async with trio.open_nursery() as n:
        n.start_soon(browse, send, ca_fingerprint, wait)
        deadline = trio.current_time() + wait
        async for addr, port in recv:
            found.append((addr, port, None))
            deadline = min(deadline, trio.current_time() + first_wait)
            break
        with trio.move_on_at(deadline):
            async for addr, port in recv:
                found.append((addr, port, None))
        n.cancel_scope.cancel()
    if not found:
        log.warning("no controller with our CA found by zeroconf within %.0f s", wait)
    return found
