"""The controller side of one member session (pure, sans-IO).

Bytes from the TLS stream go in with ``receive_data(data, now)``; bytes to write come out
of ``data_to_send()``; ``closed`` says the shell must close the connection after writing.
Authorization and key material come from a ``Backend`` (the group manager in the trio
shell, a fake in tests). Every transition lives in ``TRANSITIONS``; a message with no
entry for the current state gets ``Error("unexpected-message")`` and the session closes.

States: ``await-register`` -> ``registered`` -> ``closed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from groupsec.errors import RemoteProtocolError
from groupsec.protocol.framing import FrameDecoder, encode_frame
from groupsec.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Error,
    Grant,
    Message,
    Ping,
    Pong,
    Register,
    Registered,
    RekeyPush,
    Resync,
    ResyncReply,
    decode_message_untrusted,
)

AWAIT_REGISTER, REGISTERED, CLOSED = "await-register", "registered", "closed"


@dataclass(frozen=True)
class Refused:
    code: str
    message: str


class Backend(Protocol):
    def register(self, identity: str, serial: int | None, msg: Register, now: float
                 ) -> tuple[Registered, dict[tuple[str, str], set[str]]] | Refused:
        """Registered plus the roles granted per (group, level), or a refusal."""
        ...

    def resync(self, identity: str, group: str, level: str, now: float) -> Grant | Refused: ...

    def ack(self, identity: str, msg: Ack, now: float) -> None: ...


TRANSITIONS: dict[tuple[str, type[Message]], str] = {
    (AWAIT_REGISTER, Register): "_on_register",
    (REGISTERED, Resync): "_on_resync",
    (REGISTERED, Ack): "_on_ack",
    (REGISTERED, Ping): "_on_ping",
    (REGISTERED, Pong): "_on_pong",
    (AWAIT_REGISTER, Bye): "_on_bye",
    (REGISTERED, Bye): "_on_bye",
}


class ControllerSession:
    def __init__(self, identity: str, serial: int | None, backend: Backend, now: float, *,
                 register_timeout: float = 10.0, idle_timeout: float = 120.0) -> None:
        self.identity = identity
        self.serial = serial
        self.backend = backend
        self.state = AWAIT_REGISTER
        self.levels: set[tuple[str, str]] = set()
        self.roles: dict[tuple[str, str], set[str]] = {}
        self.error: Error | None = None  # the error that closed the session, if any
        self.close_reason = ""
        self._dec = FrameDecoder()
        self._out = bytearray()
        self._idle = idle_timeout
        self._deadline = now + register_timeout
        self.counters: dict[str, int] = {"frames_in": 0, "frames_out": 0, "acks": 0, "resyncs": 0}

    # ---- I/O --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes, now: float) -> None:
        if self.state == CLOSED:
            return
        try:
            self._dec.feed(data)
            while self.state != CLOSED:
                frame = self._dec.next_frame()
                if frame is None:
                    break
                self.counters["frames_in"] += 1
                self._handle(decode_message_untrusted(frame), now)
        except RemoteProtocolError as exc:
            self._fail(exc.code, str(exc))
        if self.state == REGISTERED:
            self._deadline = now + self._idle

    def _handle(self, msg: Message, now: float) -> None:
        name = TRANSITIONS.get((self.state, type(msg)))
        if name is None:
            self._fail("unexpected-message", f"{msg.TYPE!r} is not allowed in state {self.state}")
            return
        getattr(self, name)(msg, now)

    def get_timer(self) -> float | None:
        return None if self.state == CLOSED else self._deadline

    def handle_timer(self, now: float) -> None:
        if self.state != CLOSED and now >= self._deadline:
            if self.state == AWAIT_REGISTER:
                self._fail("bad-message", "no Register before the timeout")
            else:
                self._send(Bye("idle-timeout"))
                self._close("idle-timeout")

    # ---- outbound from the controller ------------------------------------------------------

    def push_rekey(self, datagram: bytes) -> bool:
        if self.state != REGISTERED:
            return False
        self._send(RekeyPush(datagram))
        return True

    def push_grant(self, grant: Grant) -> bool:
        """Unsolicited fresh grant (KEK after an eviction, a sender's own per-sender SA)."""
        if self.state != REGISTERED or grant.policy.key not in self.levels:
            return False
        self._send(ResyncReply(grant.to_wire()))
        return True

    def close_with(self, code: str, message: str) -> None:
        """The controller ends the session (e.g. the member was revoked)."""
        if self.state != CLOSED:
            self._fail(code, message)

    def ping(self, nonce: int) -> None:
        if self.state == REGISTERED:
            self._send(Ping(nonce))

    # ---- handlers ---------------------------------------------------------------------------

    def _on_register(self, msg: Register, now: float) -> None:
        if msg.version != PROTOCOL_VERSION:
            self._fail("unsupported-version", f"protocol version {msg.version} is not {PROTOCOL_VERSION}")
            return
        msg.requests()  # validates every request; raises RemoteProtocolError(bad-message)
        res = self.backend.register(self.identity, self.serial, msg, now)
        if isinstance(res, Refused):
            self._fail(res.code, res.message)
            return
        registered, roles = res
        self.roles = {k: set(v) for k, v in roles.items()}
        self.levels = set(roles)
        self.state = REGISTERED
        self._send(registered)

    def _on_resync(self, msg: Resync, now: float) -> None:
        if (msg.group, msg.level) not in self.levels:
            self._fail("not-authorized", f"resync for {msg.group}/{msg.level}, which this session does not hold")
            return
        self.counters["resyncs"] += 1
        res = self.backend.resync(self.identity, msg.group, msg.level, now)
        if isinstance(res, Refused):
            self._fail(res.code, res.message)
            return
        self._send(ResyncReply(res.to_wire()))

    def _on_ack(self, msg: Ack, now: float) -> None:
        if (msg.group, msg.level) not in self.levels:
            self._fail("not-authorized", f"ack for {msg.group}/{msg.level}, which this session does not hold")
            return
        self.counters["acks"] += 1
        self.backend.ack(self.identity, msg, now)

    def _on_ping(self, msg: Ping, now: float) -> None:
        self._send(Pong(msg.nonce))

    def _on_pong(self, msg: Pong, now: float) -> None:
        pass

    def _on_bye(self, msg: Bye, now: float) -> None:
        self._close("bye")

    # ---- helpers ----------------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        self._out += encode_frame(msg.encode())
        self.counters["frames_out"] += 1

    def _fail(self, code: str, message: str) -> None:
        self.error = Error(code, message[:500])
        self._send(self.error)
        self._close(code)

    def _close(self, reason: str) -> None:
        self.state = CLOSED
        self.close_reason = reason

    def statistics(self) -> dict[str, Any]:
        return {"state": self.state, "identity": self.identity, **self.counters}
