"""One security association: ESP seal/open of the ESP core (RFC 4303), its sequence
numbers, lifetimes, anti-replay windows and counters.

The ESP *core* is what follows an IP header (or what an ESP-in-UDP datagram carries):
SPI, sequence number, IV, the encrypted payload with its trailer, and the ICV. Whole IP
packets, and AH, are handled by ``groupsec.ipsec.packet`` on top of this class.

Counter-mode IVs (GCM, GMAC, ChaCha20-Poly1305) are built as
``sender_id (top sender_id_bits bits) | random per-SA-instance bits | 32-bit sequence number``.
Within one SA instance the sequence number never repeats, so the nonce never repeats; two
senders sharing a key differ in the sender ID (RFC 6054); and the random middle bits keep an
SA that was re-created with the same key (a restarted sender) off the nonces it used before,
as Linux's seqiv does with its per-SA salt.

The per-packet path is written for speed: precompiled structs, one AEAD object per SA,
integer counters, and one comparison per lifetime kind before anything slow is looked at.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag

from groupsec.errors import (
    AuthenticationFailed,
    BadPacket,
    LocalProtocolError,
    PacketDropped,
    ReplayDetected,
    SAExpired,
    UnknownSPI,
)
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.replay import ReplayWindow
from groupsec.ipsec.transforms import PAD, CbcCipher, HmacIcv, make_aead

SEQ_MAX = 0xFFFFFFFF  # no ESN: the 32-bit counter never wraps
SEQ_SOFT = SEQ_MAX - (1 << 20)  # ask for a rekey well before the counter runs out
_NEVER = 1 << 80
_INF = float("inf")

_SPISEQ = struct.Struct("!II")
_HDR_IV = struct.Struct("!IIQ")
_NONCE = struct.Struct("!4sQ")
# _PADLEN[padlen]: the padding followed by the pad length byte, what a trailer must end with
_PADLEN = [PAD[p] + bytes((p,)) for p in range(256)]
# _TRAILER4[padlen][nh]: the trailer of a 4-byte aligned suite
_TRAILER4 = [[PAD[p] + bytes((p, nh)) for nh in range(256)] for p in range(4)]


@dataclass(frozen=True, slots=True)
class RekeyNeeded:
    """A soft lifetime was crossed (``reason``: packets, bytes, seconds or sequence)."""

    spi: int
    reason: str


@dataclass(frozen=True, slots=True)
class SAHardExpired:
    """The SA reached a hard limit and refuses traffic from now on."""

    spi: int
    reason: str


class SecurityAssociation:
    """A running SA. ``direction`` "out" seals, "in" opens."""

    def __init__(self, params: SAParams, direction: Literal["in", "out"], now: float, *,
                 _test_iv_source: Callable[[int], bytes] | None = None, _test_next_seq: int = 1) -> None:
        if direction not in ("in", "out"):
            raise LocalProtocolError(f"direction {direction!r} is not one of in, out")
        suite = params.suite_obj
        self.params = params
        self.direction: str = direction
        self.suite = suite
        self._spi = params.spi
        self._start = now
        self._events: list[object] = []
        self._drops: dict[str, int] = {}
        self._expired = False
        self._fired: set[str] = set()
        self._packets = 0  # inbound: opened; outbound: derived from the sequence number
        self._bytes = 0
        self._iv_source = _test_iv_source
        if not 1 <= _test_next_seq <= SEQ_MAX:
            raise LocalProtocolError("first sequence number must be 1..2^32-1")
        self._seq = _test_next_seq - 1  # last sequence number sealed
        self._seq0 = self._seq
        # transforms, created once
        self._kind = suite.kind
        self._aead_encrypt: Callable[..., bytes] | None = None
        self._fast_encrypt: Callable[..., bytes] | None = None
        self._aead_decrypt: Callable[..., bytes] | None = None
        self._open_aead: Callable[..., bytes] | None = None  # the inline open of AEAD suites
        self._salt = b""
        self._cbc: CbcCipher | None = None
        self._icv: HmacIcv | None = None
        if suite.protocol == "esp" and suite.kind in ("aead", "gmac"):
            aead, self._salt = make_aead(suite, params.enc_key)
            self._aead_encrypt = aead.encrypt
            self._aead_decrypt = aead.decrypt
            if suite.kind == "aead" and _test_iv_source is None and direction == "out":
                self._fast_encrypt = aead.encrypt
            if suite.kind == "aead":
                self._open_aead = aead.decrypt
        if suite.kind == "cbc-hmac":
            self._cbc = CbcCipher(params.enc_key)
        if suite.hash_name is not None:
            self._icv = HmacIcv(suite.hash_name, params.auth_key, suite.icv_len)
        self.icv_len = suite.icv_len
        self.iv_len = suite.iv_len
        self._block = suite.block
        self._min_len = 8 + suite.iv_len + suite.icv_len + 2
        # counter-mode IVs: sender ID on top, random bits in the middle, sequence below
        bits = params.sender_id_bits
        self._sender_shift = 64 - bits if bits else 0
        self._iv_hi = 0
        if suite.counter_mode and direction == "out":
            mid_bits = 32 - bits
            mid = int.from_bytes(os.urandom(4), "big") & ((1 << mid_bits) - 1)
            self._iv_hi = ((params.sender_id or 0) << (64 - bits) if bits else 0) | (mid << 32)
        self._windows: dict[int, ReplayWindow] = {}
        self._lt = params.lifetime
        self._seq_check = _NEVER
        self._bytes_check = _NEVER
        self._time_check = _INF
        self._in_hard_pkt = _NEVER
        self._in_hard_bytes = _NEVER
        self._pkt_check = _NEVER
        self._recompute_checks()

    # --- lifetimes ------------------------------------------------------------------------

    def _recompute_checks(self) -> None:
        lt, fired = self._lt, self._fired
        if self._expired:
            self._seq_check = self._bytes_check = self._in_hard_pkt = self._in_hard_bytes = self._pkt_check = 0
            self._time_check = -_INF
            return
        if self.direction == "in":
            self._seq_check = 0  # sealing on an inbound SA is a misuse: always take the slow path
            self._pkt_check = lt.soft_packets if lt.soft_packets and "packets" not in fired else _NEVER
        else:
            cands = [SEQ_MAX + 1]
            if "sequence" not in fired:
                cands.append(SEQ_SOFT)
            if lt.soft_packets and "packets" not in fired:
                cands.append(self._seq0 + lt.soft_packets)
            if lt.hard_packets:
                cands.append(self._seq0 + lt.hard_packets + 1)
            self._seq_check = min(cands)
        b = [_NEVER]
        if lt.soft_bytes and "bytes" not in fired:
            b.append(lt.soft_bytes)
        if lt.hard_bytes:
            b.append(lt.hard_bytes + 1)
        self._bytes_check = min(b)
        t = [_INF]
        if lt.soft_seconds and "seconds" not in fired:
            t.append(self._start + lt.soft_seconds)
        if lt.hard_seconds:
            t.append(self._start + lt.hard_seconds)
        self._time_check = min(t)
        # opening on an outbound SA is a misuse: route it to the slow path, which refuses it
        self._in_hard_pkt = (lt.hard_packets or _NEVER) if self.direction == "in" else 0
        self._in_hard_bytes = lt.hard_bytes or _NEVER

    def _expire(self, reason: str) -> SAExpired:
        if not self._expired:
            self._expired = True
            self._events.append(SAHardExpired(self._spi, reason))
            self._recompute_checks()
        return SAExpired(f"SA {self._spi:#x} expired ({reason})")

    def _soft(self, reason: str) -> None:
        if reason not in self._fired:
            self._fired.add(reason)
            self._events.append(RekeyNeeded(self._spi, reason))

    def _out_slow(self, seq: int, n: int, now: float) -> None:
        """Lifetime bookkeeping for the packet that would use ``seq`` and add ``n`` bytes."""
        if self.direction != "out":
            raise LocalProtocolError("seal on an inbound SA")
        lt = self._lt
        if self._expired:
            raise SAExpired(f"SA {self._spi:#x} has expired")
        if seq > SEQ_MAX:
            raise self._expire("sequence")
        packets = seq - self._seq0
        if lt.hard_packets and packets > lt.hard_packets:
            raise self._expire("packets")
        if lt.hard_bytes and self._bytes + n > lt.hard_bytes:
            raise self._expire("bytes")
        if lt.hard_seconds and now >= self._start + lt.hard_seconds:
            raise self._expire("seconds")
        if seq >= SEQ_SOFT:
            self._soft("sequence")
        if lt.soft_packets and packets >= lt.soft_packets:
            self._soft("packets")
        if lt.soft_bytes and self._bytes + n >= lt.soft_bytes:
            self._soft("bytes")
        if lt.soft_seconds and now >= self._start + lt.soft_seconds:
            self._soft("seconds")
        self._recompute_checks()

    def _in_slow_pre(self, now: float) -> None:
        if self.direction != "in":
            raise LocalProtocolError("open on an outbound SA")
        lt = self._lt
        if self._expired:
            raise SAExpired(f"SA {self._spi:#x} has expired")
        if lt.hard_packets and self._packets >= lt.hard_packets:
            raise self._expire("packets")
        if lt.hard_bytes and self._bytes >= lt.hard_bytes:
            raise self._expire("bytes")
        if lt.hard_seconds and now >= self._start + lt.hard_seconds:
            raise self._expire("seconds")
        if lt.soft_seconds and now >= self._start + lt.soft_seconds:
            self._soft("seconds")
        self._recompute_checks()

    def _in_slow_post(self) -> None:
        lt = self._lt
        if lt.soft_packets and self._packets >= lt.soft_packets:
            self._soft("packets")
        if lt.soft_bytes and self._bytes >= lt.soft_bytes:
            self._soft("bytes")
        self._recompute_checks()

    # --- outbound -------------------------------------------------------------------------

    def next_seq(self, nbytes: int, now: float) -> int:
        """Allocate the next sequence number for a packet of ``nbytes`` (AH and slow paths).
        Raises ``SAExpired`` at a hard limit or when the counter would wrap."""
        seq = self._seq + 1
        if seq >= self._seq_check or now >= self._time_check or self._bytes + nbytes >= self._bytes_check:
            self._out_slow(seq, nbytes, now)
        self._seq = seq
        self._bytes += nbytes
        return seq

    def seal_esp(self, next_header: int, payload: bytes | memoryview, now: float) -> bytes:
        """ESP header .. ICV for ``payload`` (an inner IP packet in tunnel mode, the
        transport payload otherwise)."""
        seq = self._seq + 1
        n = len(payload)
        if seq >= self._seq_check or now >= self._time_check or self._bytes + n >= self._bytes_check:
            self._out_slow(seq, n, now)
        self._seq = seq
        self._bytes += n
        enc = self._fast_encrypt
        if enc is not None:
            iv = self._iv_hi | seq
            hdr = _HDR_IV.pack(self._spi, seq, iv)
            tr = _TRAILER4[(-n - 2) & 3][next_header]
            pt = payload + tr if type(payload) is bytes else bytes(payload) + tr
            return hdr + enc(_NONCE.pack(self._salt, iv), pt, hdr[:8])
        return self._seal_general(seq, next_header, payload, n)

    def _make_iv(self, seq: int) -> bytes:
        if self._iv_source is not None:
            iv = self._iv_source(seq)
            if len(iv) != self.iv_len:
                raise LocalProtocolError("test IV of the wrong length")
            return iv
        if self.suite.counter_mode:
            return (self._iv_hi | seq).to_bytes(8, "big")
        return os.urandom(self.iv_len)

    def _seal_general(self, seq: int, nh: int, payload: bytes | memoryview, n: int) -> bytes:
        if not 0 <= nh <= 255:
            raise LocalProtocolError("next header must be 0..255")
        padlen = (-n - 2) % self._block
        pt = bytes(payload) + PAD[padlen] + bytes((padlen, nh))
        hdr = _SPISEQ.pack(self._spi, seq)
        iv = self._make_iv(seq)
        kind = self._kind
        if kind == "aead":
            assert self._aead_encrypt is not None
            return hdr + iv + self._aead_encrypt(self._salt + iv, pt, hdr)
        if kind == "gmac":
            assert self._aead_encrypt is not None
            return hdr + iv + pt + self._aead_encrypt(self._salt + iv, b"", hdr + iv + pt)
        assert self._icv is not None
        if kind == "cbc-hmac":
            assert self._cbc is not None
            body = hdr + iv + self._cbc.encrypt(iv, pt)
        else:
            body = hdr + pt
        return body + self._icv.compute(body)

    # --- inbound --------------------------------------------------------------------------

    def window_for(self, sender_id: int) -> ReplayWindow:
        w = self._windows.get(sender_id)
        if w is None:
            w = self._windows[sender_id] = ReplayWindow(self.params.replay_window)
        return w

    def open_esp_untrusted(self, data: bytes | memoryview, now: float) -> tuple[int, bytes, int]:
        """Verify and decrypt an ESP core. Returns (next_header, payload, sender_id; 0 if none).
        Raises only ``PacketDropped`` subclasses, each counted under its ``reason``."""
        try:
            n = len(data)
            if n < self._min_len:
                raise BadPacket("ESP packet too short")
            spi, seq = _SPISEQ.unpack_from(data)
            if spi != self._spi:
                raise UnknownSPI(f"SPI {spi:#x} is not this SA's")
            if now >= self._time_check or self._packets >= self._in_hard_pkt or self._bytes >= self._in_hard_bytes:
                self._in_slow_pre(now)
            sender = 0
            if self._sender_shift:
                sender = int.from_bytes(data[8:16], "big") >> self._sender_shift
                if sender == 0:
                    raise BadPacket("sender ID 0 is reserved")
            window = self._windows.get(sender)
            if window is None:
                window = self.window_for(sender)
            # the replay check of ReplayWindow.check, inlined (no state change before the ICV verifies)
            top = window.top
            if seq <= top and (seq == 0 or top - seq >= window.size or window._ring[seq & window._ring_mask] == seq):
                raise ReplayDetected("replayed or too old sequence number")
            dec = self._open_aead
            if dec is not None:
                try:
                    pt = dec(self._salt + data[8:16], data[16:], data[:8])
                except InvalidTag:
                    raise AuthenticationFailed("ICV mismatch") from None
            else:
                pt = self._open_general(data, n)
            padlen = pt[-2]
            m = len(pt) - 2 - padlen
            if padlen and not pt.endswith(_PADLEN[padlen], 0, m + padlen + 1):
                raise BadPacket("bad ESP padding")
            # ReplayWindow.accept, inlined: only now that the ICV verified
            window._ring[seq & window._ring_mask] = seq
            if seq > top:
                window.top = seq
            self._packets += 1
            self._bytes += m
            if self._packets >= self._pkt_check or self._bytes >= self._bytes_check:
                self._in_slow_post()
            return pt[-1], pt[:m], sender
        except PacketDropped as exc:
            self._drops[exc.reason] = self._drops.get(exc.reason, 0) + 1
            raise

    def _open_general(self, data: bytes | memoryview, n: int) -> bytes:
        ivl, icvl = self.iv_len, self.icv_len
        if self._kind == "gmac":
            assert self._aead_decrypt is not None
            iv = bytes(data[8:16])
            try:
                self._aead_decrypt(self._salt + iv, data[n - icvl:], data[: n - icvl])
            except InvalidTag:
                raise AuthenticationFailed("ICV mismatch") from None
            return bytes(data[16 : n - icvl])
        assert self._icv is not None
        if not self._icv.verify(data[n - icvl:], data[: n - icvl]):
            raise AuthenticationFailed("ICV mismatch")
        if self._kind == "cbc-hmac":
            assert self._cbc is not None
            return self._cbc.decrypt(data[8 : 8 + ivl], data[8 + ivl : n - icvl])
        return bytes(data[8 : n - icvl])

    def accepted(self, window: ReplayWindow, seq: int, nbytes: int) -> None:
        """Record a packet whose ICV verified (used by AH)."""
        window.accept(seq)
        self._packets += 1
        self._bytes += nbytes
        if self._packets >= self._pkt_check or self._bytes >= self._bytes_check:
            self._in_slow_post()

    def check_inbound(self, seq: int, sender_id: int, now: float) -> ReplayWindow:
        """Lifetime and replay checks before an ICV is verified (used by AH)."""
        if self.direction != "in":
            raise LocalProtocolError("open on an outbound SA")
        if now >= self._time_check or self._packets >= self._in_hard_pkt or self._bytes >= self._in_hard_bytes:
            self._in_slow_pre(now)
        window = self.window_for(sender_id)
        window.check(seq)
        return window

    def icv(self) -> HmacIcv:
        if self._icv is None:
            raise LocalProtocolError(f"{self.suite.name} has no HMAC")
        return self._icv

    # --- accounting -----------------------------------------------------------------------

    def count_drop(self, exc: PacketDropped) -> None:
        self._drops[exc.reason] = self._drops.get(exc.reason, 0) + 1

    def pop_events(self) -> list[object]:
        events, self._events = self._events, []
        return events

    @property
    def expired(self) -> bool:
        return self._expired

    @property
    def seq(self) -> int:
        """Outbound: the last sequence number sealed. Inbound: the highest accepted."""
        if self.direction == "out":
            return self._seq
        return max((w.top for w in self._windows.values()), default=0)

    def statistics(self) -> dict[str, object]:
        packets = self._seq - self._seq0 if self.direction == "out" else self._packets
        return {
            "spi": self._spi,
            "direction": self.direction,
            "protocol": self.params.protocol,
            "suite": self.suite.name,
            "group": self.params.group,
            "packets": packets,
            "bytes": self._bytes,
            "drops": dict(self._drops),
            "seq": self.seq,
            "expired": self._expired,
            "senders": len(self._windows),
        }

    def __repr__(self) -> str:
        return (f"SecurityAssociation(spi={self._spi:#x}, {self.params.protocol}/{self.suite.name}, "
                f"{self.params.mode}, dst={self.params.dst}, direction={self.direction})")
