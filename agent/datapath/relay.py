"""The local plaintext relay (no privilege needed).

Applications send plain UDP to ``listen`` (normally on 127.0.0.1); the relay protects
each datagram with the group's outbound SA and multicasts it. Datagrams the wire
decrypted for the group are sent, payload only, to ``deliver``.

The application's source port is carried as the inner UDP source port; the inner
destination port is the group's selector port (``policy.port``), or ``group_port`` when
the policy names none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from agent.datapath import sockets as so
from agent.datapath.engine import GroupEngine, PlainEngine
from agent.datapath.wire import BATCH, BUFSIZE, DEFAULT_RCVBUF, DEFAULT_SNDBUF, count, send_counted
from groupsec.errors import ConfigError, GroupSecError


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """One group's relay: where apps send plaintext, and where decrypted payloads go.

    ``listen=None``: no sending through the relay (receive only). ``deliver=None``: no
    local delivery (send only). ``group_port``: the inner destination port when the
    group's policy has no port selector.
    """

    listen: tuple[str, int] | None = ("127.0.0.1", 0)
    deliver: tuple[str, int] | None = None
    group_port: int | None = None


class Relay:
    def __init__(self, engine: GroupEngine | PlainEngine, config: RelayConfig, send: Callable[[Any], None], *,
                 rcvbuf: int | None = DEFAULT_RCVBUF, sndbuf: int | None = DEFAULT_SNDBUF,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.config = config
        self._send = send
        self._clock = clock
        dport = engine.policy.port if engine.policy.port is not None else config.group_port
        if config.listen is not None and dport is None:
            raise ConfigError(f"group {engine.policy.group!r}: relay needs a group_port (the policy has no port)")
        self.dport = dport or 0
        self.listen = so.open_udp(config.listen, rcvbuf=rcvbuf) if config.listen is not None else None
        self.out = None
        if config.deliver is not None:
            try:
                self.out = so.open_udp((config.deliver[0], 0), sndbuf=sndbuf)
                self.out.connect(config.deliver)
            except (OSError, ConfigError):
                if self.listen is not None:
                    self.listen.close()
                raise
        self.drops: dict[str, int] = {}
        self.app_in = self.delivered = 0

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return self.listen.getsockname()[:2] if self.listen is not None else None

    def deliver(self, pkt: Any, payload: Any) -> None:
        """Hand one decrypted datagram's payload to the local application port."""
        if self.out is not None and send_counted(self.out, payload, self.drops):
            self.delivered += 1

    async def send_loop(self) -> None:
        """Application -> relay -> protected multicast."""
        if self.listen is None:
            return
        sock = self.listen
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        recvfrom_into = sock.recvfrom_into
        engine = self.engine
        seal = engine.seal_payload
        send = self._send
        dport = self.dport
        drops = self.drops
        clock = self._clock
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = clock()
            for _ in range(BATCH):
                try:
                    n, addr = recvfrom_into(buf)
                except BlockingIOError:
                    break
                except OSError:
                    count(drops, "rx-error")
                    break
                self.app_in += 1
                try:
                    out = seal(view[:n], addr[1], dport, now)
                except GroupSecError as exc:
                    count(drops, exc.reason)  # e.g. receive-only, sa-expired, no-signing-key
                    continue
                for data in out:  # one datagram; with "sign-batched" none, or a closed window
                    send(data)

    def close(self) -> None:
        for s in (self.listen, self.out):
            if s is not None:
                s.close()

    def statistics(self) -> dict[str, Any]:
        return {"listen": self.listen_address, "deliver": self.config.deliver, "app_in": self.app_in,
                "delivered": self.delivered, "drops": dict(self.drops)}
