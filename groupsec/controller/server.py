"""The trio shell: TLS 1.3 mTLS listener, one task per session, multicast rekey socket,
and the local admin socket (``DIR/admin.sock``, mode 0600, same-uid peers only).

Admin requests are one frame each (msgpack map ``{"op": ...}``), answered by one frame:
    {"op": "reload", "name": NAME}      a member record changed (re-read; lost levels are rekeyed)
    {"op": "revoke", "name": NAME}      close the member's sessions and evict it
    {"op": "revoke", "names": [NAME...]} the same for several members at once (one rekey per level)
    {"op": "rekey", "group": G, "level": L|None, "kek": bool}
    {"op": "status"}
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import trio

from groupsec.controller import pki
from groupsec.controller.app import ControllerApp, SessionHandle
from groupsec.controller.config import LevelConfig
from groupsec.errors import GroupSecError, RemoteProtocolError
from groupsec.protocol.controller import ControllerSession
from groupsec.protocol.framing import FrameDecoder, encode_frame
from groupsec.protocol.messages import pack, unpack_untrusted

log = logging.getLogger("groupsec.controller.server")
ADMIN_SOCK = "admin.sock"


def server_ssl_context(home: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(home / pki.CTL_CERT, home / pki.CTL_KEY)
    ctx.load_verify_locations(cafile=str(home / pki.CA_CERT))
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def _peer_identity(stream: trio.SSLStream[Any]) -> tuple[str, int | None]:
    cert = stream.getpeercert()
    cn = ""
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                cn = v
    serial = cert.get("serialNumber")
    return cn, int(serial, 16) if serial else None


def _tls_reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return "tls-" + (cause.verify_message or "verify-failed").replace(" ", "-")
    if isinstance(cause, ssl.SSLError):
        return "tls-" + (cause.reason or "error").lower().replace("_", "-")
    return "tls-closed"


class ControllerServer:
    def __init__(self, app: ControllerApp, ssl_context: ssl.SSLContext, home: Path | None = None) -> None:
        self.app = app
        self.ctx = ssl_context
        self.home = home
        cfg = app.config.controller
        self.cfg = cfg
        self.active = 0
        self.listen_ports: list[int] = []
        self._mcast: dict[int, socket.socket] = {}

    # ---- listener --------------------------------------------------------------------------

    async def serve(self, host: str | None = None, port: int | None = None, *,
                    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED) -> None:
        self.app.multicast = self._send_multicast
        listeners = await trio.open_tcp_listeners(port if port is not None else self.cfg.listen_port,
                                                  host=host if host is not None else self.cfg.listen_host,
                                                  backlog=4096)
        self.listen_ports = [ln.socket.getsockname()[1] for ln in listeners]
        try:
            async with trio.open_nursery() as nursery:
                if self.home is not None:
                    await nursery.start(self._admin_server)
                nursery.start_soon(self._ack_flusher)
                task_status.started(self.listen_ports)
                log.info("listening on %s port %s", host or self.cfg.listen_host, self.listen_ports)
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)
        finally:
            for sock in self._mcast.values():
                sock.close()
            self._mcast.clear()

    async def _ack_flusher(self) -> None:
        while True:
            await trio.sleep(2.0)
            self.app.flush_acks()

    async def _handle(self, conn: trio.SocketStream) -> None:
        if self.active >= self.cfg.max_connections:
            self.app.count("refused-too-many-connections")
            await trio.aclose_forcefully(conn)
            return
        self.active += 1
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            stream = trio.SSLStream(conn, self.ctx, server_side=True)
            with trio.move_on_after(self.cfg.handshake_timeout) as cs:
                try:
                    await stream.do_handshake()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    reason = _tls_reason(exc)
                    self.app.count(reason)
                    log.info("TLS handshake failed: %s", reason)
                    return
            if cs.cancelled_caught:
                self.app.count("handshake-timeout")
                log.info("TLS handshake timed out")
                return
            await self._session(stream)
        except Exception:  # a bug in one session must not take the server down
            self.app.count("internal-errors")
            log.exception("session handler failed")
        finally:
            self.active -= 1
            await trio.aclose_forcefully(conn)

    async def _session(self, stream: trio.SSLStream[Any]) -> None:
        identity, serial = _peer_identity(stream)
        now = trio.current_time()
        session = ControllerSession(identity, serial, self.app, now,
                                    register_timeout=self.cfg.handshake_timeout, idle_timeout=self.cfg.idle_timeout)
        wake_send, wake_recv = trio.open_memory_channel[None](1)

        def wake() -> None:
            try:
                wake_send.send_nowait(None)
            except trio.WouldBlock:
                pass

        handle = SessionHandle(session, wake)
        send_lock = trio.Lock()

        async def flush() -> None:
            async with send_lock:
                data = session.data_to_send()
                if data:
                    await stream.send_all(data)

        async def writer() -> None:
            async for _ in wake_recv:
                await flush()
                if session.closed:
                    return

        async def reader() -> None:
            while not session.closed:
                deadline = session.get_timer()
                with trio.move_on_at(deadline if deadline is not None else float("inf")):
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    before = session.state
                    session.receive_data(data, trio.current_time())
                    if before != session.state and session.state == "registered":
                        self._registered(handle)
                    await flush()
                    continue
                session.handle_timer(trio.current_time())
                await flush()

        async def guarded(fn: Any, cancel: trio.CancelScope) -> None:
            try:
                await fn()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.app.count("connection-lost")
            finally:
                cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guarded, writer, nursery.cancel_scope)
                nursery.start_soon(guarded, reader, nursery.cancel_scope)
            if session.error is not None:
                self.app.count(f"error-{session.error.code}")
                log.warning("session %s closed with error %s: %s", identity, session.error.code,
                            session.error.message[:200])
            with trio.move_on_after(1):
                try:
                    await flush()
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            self.app.remove_session(handle)

    def _registered(self, handle: SessionHandle) -> None:
        handle.roles = handle.session.roles
        self.app.add_session(handle)

    # ---- multicast -------------------------------------------------------------------------

    def _send_multicast(self, lc: LevelConfig, datagram: bytes) -> None:
        addr, port = lc.policy.rekey_addr, lc.policy.rekey_port
        if addr is None or port is None:
            return
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = self._mcast.get(fam)
        if sock is None:
            sock = socket.socket(fam, socket.SOCK_DGRAM)
            sock.setblocking(False)
            if fam == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, self.cfg.rekey_ttl)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, self.cfg.rekey_ttl)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
            if self.cfg.rekey_interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.cfg.rekey_interface.encode())
            self._mcast[fam] = sock
        try:
            sock.sendto(datagram, (addr, port))  # non-blocking; a full buffer drops (members resync)
            self.app.count("multicast-sent")
        except (BlockingIOError, OSError) as exc:
            self.app.count("multicast-errors")
            log.debug("multicast send to %s:%s failed: %s", addr, port, exc)

    # ---- admin socket ----------------------------------------------------------------------

    async def _admin_server(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.home is not None
        path = self.home / ADMIN_SOCK
        if path.exists():
            path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._admin_conn, [listener])
        finally:
            path.unlink(missing_ok=True)

    async def _admin_conn(self, stream: trio.SocketStream) -> None:
        async with stream:
            creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            uid = int.from_bytes(creds[4:8], "little")
            if uid not in (0, os.getuid()):
                self.app.count("admin-refused")
                return
            dec = FrameDecoder()
            with trio.move_on_after(10):
                while (frame := dec.next_frame()) is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    dec.feed(data)
                try:
                    req = unpack_untrusted(frame)
                    reply = self.admin(req if isinstance(req, dict) else {})
                except (GroupSecError, KeyError, TypeError, ValueError) as exc:
                    code = exc.code if isinstance(exc, RemoteProtocolError) else type(exc).__name__
                    reply = {"ok": False, "error": f"{code}: {exc}"[:500]}
                await stream.send_all(encode_frame(pack(reply)))

    def admin(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        app = self.app
        if op == "status":
            return {"ok": True, "status": app.status()}
        if op == "rekey":
            group = req.get("group")
            if not isinstance(group, str) or not app.config.group_levels(group):
                return {"ok": False, "error": f"unknown group {group!r}"}
            plans = app.rekey_now(group, req.get("level"), bool(req.get("kek")))
            return {"ok": True, "rekeyed": [{"group": p.group, "level": p.level, "msg_id": p.msg_id} for p in plans]}
        if op == "revoke":
            names = req.get("names")
            if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
                return {"ok": True, "levels": app.revoke_many(names[:4096])}  # batch: one tree rekey per level
            name = str(req.get("name"))
            return {"ok": True, "levels": app.revoke(name)}
        if op == "reload":
            name = str(req.get("name"))
            lost = req.get("lost") or []
            return {"ok": True, "levels": app.reload_member(name, lost if isinstance(lost, list) else [])}
        return {"ok": False, "error": f"unknown op {op!r}"[:100]}
