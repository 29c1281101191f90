"""Length-prefixed frames for the control protocol (TLS stream).

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. A frame
longer than ``MAX_FRAME`` (1 MiB) is a protocol error and the connection is closed.
``FrameDecoder`` is sans-IO: feed it bytes, take complete frames out.
"""

from __future__ import annotations

import struct

from groupsec.errors import RemoteProtocolError

MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(payload)) + payload


class FrameDecoder:
    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf, 0)
            if n > self._max:
                raise RemoteProtocolError(f"frame of {n} bytes exceeds the {self._max}-byte limit", "frame-too-large")

    def next_frame(self) -> bytes | None:
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf, 0)
        if n > self._max:
            raise RemoteProtocolError(f"frame of {n} bytes exceeds the {self._max}-byte limit", "frame-too-large")
        if len(self._buf) < 4 + n:
            return None
        frame = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
        return frame

    @property
    def buffered(self) -> int:
        return len(self._buf)
