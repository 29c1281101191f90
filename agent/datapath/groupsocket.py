"""``GroupSocket``: a trio API for applications that embed the agent.

    async with datapath.open_socket(("video", ""), port=5004) as gs:
        await gs.send(b"frame")          # protected with the group's outbound SA
        msg = await gs.receive()         # a Datagram the engine decrypted and checked

A receive-only member's ``send`` raises ``ReceiveOnly`` (a ``LocalProtocolError``).
Received datagrams wait in a bounded queue; when it is full they are dropped and counted
(``statistics()["drops"]["queue-full"]``), never queued without limit.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from agent.datapath.engine import GroupEngine
from groupsec.errors import GroupSecError, LocalProtocolError
from groupsec.ipsec.ip import parse_ip_untrusted


@dataclass(frozen=True, slots=True)
class Datagram:
    payload: bytes
    src: str  # the sender's address (inner source: address preservation)
    sport: int
    dport: int


class GroupSocket:
    def __init__(self, engine: GroupEngine, transmit: Callable[[bytes], Awaitable[None]], *,
                 sport: int = 0, dport: int | None = None, queue: int = 1024,
                 on_close: Callable[[GroupSocket], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self._transmit = transmit
        self.sport = sport
        port = dport if dport is not None else engine.policy.port
        if port is None:
            raise LocalProtocolError(f"group {engine.policy.group!r} has no port selector: pass dport")
        self.dport = port
        self._send_ch, self._recv_ch = trio.open_memory_channel[Datagram](queue)
        self._on_close = on_close
        self._clock = clock
        self.closed = False
        self.sent = self.received = 0
        self.drops: dict[str, int] = {}

    # called by the data path for every datagram the engine opened for this group
    def _deliver(self, pkt: Any, payload: Any) -> None:
        try:
            info = parse_ip_untrusted(pkt)
        except GroupSecError:
            return
        if info.dport != self.dport:
            return
        dg = Datagram(bytes(payload), info.src, info.sport or 0, info.dport)
        try:
            self._send_ch.send_nowait(dg)
        except trio.WouldBlock:
            self.drops["queue-full"] = self.drops.get("queue-full", 0) + 1

    async def send(self, payload: bytes) -> None:
        """Protect ``payload`` and multicast it to the group. Raises ``ReceiveOnly`` when this
        member has no outbound SA, ``SAExpired`` when the outbound SA is used up. In a
        "sign-batched" group the datagram may leave later, when its signing window closes
        (at most ``max_delay``, 20 ms by default: the data path's timer sends it)."""
        if self.closed:
            raise trio.ClosedResourceError("GroupSocket is closed")
        for data in self.engine.seal_payload(payload, self.sport, self.dport, self._clock()):
            await self._transmit(data)  # "sign-batched": a window's packets leave when it closes
        self.sent += 1

    async def receive(self) -> Datagram:
        dg = await self._recv_ch.receive()
        self.received += 1
        return dg

    def __aiter__(self) -> GroupSocket:
        return self

    async def __anext__(self) -> Datagram:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._send_ch.close()
            if self._on_close is not None:
                self._on_close(self)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> GroupSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def statistics(self) -> dict[str, Any]:
        return {"group": self.engine.policy.group, "level": self.engine.policy.level, "sport": self.sport,
                "dport": self.dport, "sent": self.sent, "received": self.received,
                "queued": self._recv_ch.statistics().current_buffer_used, "drops": dict(self.drops)}
