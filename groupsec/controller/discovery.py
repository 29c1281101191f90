"""Zeroconf advertisement of the controller (the ONLY zeroconf module on the controller side).

python-zeroconf runs its own thread; its synchronous API is called inside
``trio.to_thread.run_sync``. Discovery never replaces authentication: the TXT record
carries the CA fingerprint so an agent can pick the right controller, and the agent
still verifies the controller's certificate against its CA.
"""

from __future__ import annotations

import logging
import socket

import trio

from groupsec.protocol.messages import PROTOCOL_VERSION

log = logging.getLogger("groupsec.controller.discovery")
SERVICE = "_groupsec._tcp.local."


def _addresses() -> list[bytes]:
    out = []
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            addr = info[4][0]
            if not addr.startswith("127."):
                out.append(socket.inet_aton(addr))
    except OSError:
        pass
    return list(dict.fromkeys(out)) or [socket.inet_aton("127.0.0.1")]


async def advertise(port: int, ca_fingerprint: str, name: str | None = None, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Register the service, keep it while the task runs, unregister on cancellation."""
    from zeroconf import ServiceInfo, Zeroconf

    instance = name or f"groupsec-{socket.gethostname()}"
    info = ServiceInfo(SERVICE, f"{instance}.{SERVICE}", port=port, addresses=_addresses(),
                       properties={"version": str(PROTOCOL_VERSION), "ca": ca_fingerprint},
                       server=f"{socket.gethostname()}.local.")

    def start() -> Zeroconf:
        zc = Zeroconf()
        zc.register_service(info, allow_name_change=True)
        return zc

    try:
        zc = await trio.to_thread.run_sync(start)
    except Exception as exc:  # no multicast-capable interface: serve without advertising
        log.warning("zeroconf advertisement failed: %s", exc)
        task_status.started()
        await trio.sleep_forever()
        return
    task_status.started()
    log.info("advertising %s on port %d", SERVICE, port)
    try:
        await trio.sleep_forever()
    finally:
        def stop() -> None:
            zc.unregister_service(info)
            zc.close()

        with trio.CancelScope(shield=True), trio.move_on_after(3):
            await trio.to_thread.run_sync(stop)
