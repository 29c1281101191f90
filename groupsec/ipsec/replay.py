"""Anti-replay sliding window (RFC 4303 s3.4.3, RFC 4302 s3.4.3), one per (SA, sender).

``check(seq)`` refuses a duplicate or a number left of the window and changes nothing;
``accept(seq)`` records it and is called only after the ICV has verified, so a forged
packet can never move the window.
"""

from __future__ import annotations

from groupsec.errors import PolicyError, ReplayDetected
from groupsec.ipsec.params import MAX_REPLAY_WINDOW, MIN_REPLAY_WINDOW


class ReplayWindow:
    """A window of ``size`` sequence numbers ending at the highest one accepted.

    The bitmap is a Python int: bit ``i`` set means ``top - i`` was accepted.
    Sequence number 0 is never valid (ESP/AH counters start at 1).
    """

    __slots__ = ("_bitmap", "_mask", "size", "top")

    def __init__(self, size: int) -> None:
        if not MIN_REPLAY_WINDOW <= size <= MAX_REPLAY_WINDOW:
            raise PolicyError(
                f"replay window {size} is outside {MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW} (a window of 0 is refused)"
            )
        self.size = size
        self.top = 0
        self._bitmap = 0
        self._mask = (1 << size) - 1

    def check(self, seq: int) -> None:
        """Raise ``ReplayDetected`` if ``seq`` was seen or is too old. No state change."""
        top = self.top
        if seq > top:
            return
        if seq == 0 or top - seq >= self.size or (self._bitmap >> (top - seq)) & 1:
            raise ReplayDetected("replayed or too old sequence number")

    def accept(self, seq: int) -> None:
        """Record ``seq`` (which ``check`` passed and whose ICV verified)."""
        top = self.top
        if seq > top:
            shift = seq - top
            self._bitmap = ((self._bitmap << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
        else:
            self._bitmap |= 1 << (top - seq)

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, top={self.top})"
