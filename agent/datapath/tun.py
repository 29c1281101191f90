"""TUN mode (needs CAP_NET_ADMIN): unmodified applications send and receive plaintext
multicast with normal sockets.

The agent creates a TUN device (IFF_TUN | IFF_NO_PI, no address of its own) and a route
``GROUP/32 dev TUN`` for every protected group. An application's ``sendto(GROUP:port)``
is routed into the device; the agent reads the real IP packet, protects it (ESP/AH,
transport or tunnel) and sends it out of the wire interface. An application that joins
the group without naming an interface joins it on the TUN device (that is where the route
points), and the agent writes every packet it decrypted for the group into the device,
where the kernel delivers it to those sockets as ordinary multicast.

Device and route set-up use the ``ip`` command (iproute2); the data path itself only
reads and writes the TUN file descriptor.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from typing import Any

import trio

from agent.datapath.engine import GroupEngine
from agent.datapath.wire import BATCH, BUFSIZE, count
from groupsec.errors import ConfigError, GroupSecError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ConfigError(f"ip {' '.join(args)}: {res.stderr.strip()}")


class TunDevice:
    def __init__(self, name: str = "gsec0", mtu: int = 1400, *, clock: Callable[[], float] = time.monotonic) -> None:
        if len(name.encode()) > 15:
            raise ConfigError(f"TUN name {name!r} is longer than 15 bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"cannot open /dev/net/tun: {exc.strerror} (TUN mode needs CAP_NET_ADMIN)") from None
        try:
            res = fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
            self.name = res[:16].rstrip(b"\0").decode()
            _ip("link", "set", "dev", self.name, "mtu", str(mtu), "up")
            self.index = socket.if_nametoindex(self.name)
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(f"cannot create TUN device {name!r}: {exc.strerror}") from None
        except BaseException:
            os.close(self.fd)
            raise
        self._clock = clock
        # group address (packed) -> (engine, send to wire)
        self.routes: dict[bytes, tuple[GroupEngine, Callable[[Any], None]]] = {}
        self.drops: dict[str, int] = {}
        self.read_packets = self.written_packets = 0

    def add_group(self, engine: GroupEngine, send: Callable[[Any], None]) -> None:
        g = ipaddress.ip_address(engine.policy.dst)
        self.routes[g.packed] = (engine, send)
        fam = "-4" if g.version == 4 else "-6"
        _ip(fam, "route", "replace", f"{g}/{g.max_prefixlen}", "dev", self.name)

    def remove_group(self, engine: GroupEngine) -> None:
        g = ipaddress.ip_address(engine.policy.dst)
        if self.routes.get(g.packed, (None,))[0] is engine:
            del self.routes[g.packed]
            fam = "-4" if g.version == 4 else "-6"
            try:
                _ip(fam, "route", "del", f"{g}/{g.max_prefixlen}", "dev", self.name)
            except ConfigError:
                pass

    def write(self, pkt: Any, payload: Any = None) -> None:
        """Deliver one decrypted IP packet to local applications."""
        try:
            os.write(self.fd, pkt)
        except BlockingIOError:
            count(self.drops, "tun-full")
            return
        except OSError:
            count(self.drops, "tun-error")
            return
        self.written_packets += 1

    async def read_loop(self) -> None:
        """Applications -> TUN -> protect -> wire."""
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        fd = self.fd
        routes = self.routes
        drops = self.drops
        clock = self._clock
        while True:
            await trio.lowlevel.wait_readable(fd)
            now = clock()
            for _ in range(BATCH):
                try:
                    n = os.readv(fd, [buf])
                except BlockingIOError:
                    break
                except OSError:
                    count(drops, "read-error")
                    break
                self.read_packets += 1
                version = buf[0] >> 4 if n else 0
                if version == 4 and n >= 20:
                    dst = bytes(view[16:20])
                elif version == 6 and n >= 40:
                    dst = bytes(view[24:40])
                else:
                    count(drops, "malformed")
                    continue
                route = routes.get(dst)
                if route is None:
                    count(drops, "no-group")  # e.g. the kernel's own IGMP/MLD reports
                    continue
                engine, send = route
                try:
                    out = engine.seal_packet(bytes(view[:n]), now)
                except GroupSecError as exc:
                    count(drops, exc.reason)  # receive-only, selector, sa-expired, no-signing-key
                    continue
                for data in out:  # "sign-batched": none yet, or a whole window
                    send(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the kernel removes the device and its routes
            self.fd = -1

    def statistics(self) -> dict[str, Any]:
        return {"device": self.name, "read_packets": self.read_packets, "written_packets": self.written_packets,
                "groups": len(self.routes), "drops": dict(self.drops)}
