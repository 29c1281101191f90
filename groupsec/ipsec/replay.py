"""Anti-replay sliding window (RFC 4303 s3.4.3, RFC 4302 s3.4.3), one per (SA, sender).

``check(seq)`` refuses a duplicate or a number left of the window and changes nothing;
``accept(seq)`` records it and is called only after the ICV has verified, so a forged
packet can never move the window.
"""

from __future__ import annotations

from array import array

from groupsec.errors import PolicyError, ReplayDetected
from groupsec.ipsec.params import MAX_REPLAY_WINDOW, MIN_REPLAY_WINDOW


class ReplayWindow:
    """A window of ``size`` sequence numbers ending at ``top``, the highest one accepted.

    The accepted numbers live in a ring of ``2^k >= size`` slots: slot ``seq & ring_mask``
    holds the last number accepted there (0: none; 0 is never a valid sequence number).
    A number ``seq`` with ``top - size < seq <= top`` was accepted exactly when its slot
    holds ``seq`` itself: a later number of the same slot would be at least
    ``seq + 2^k > top``, and an earlier one differs. So a check and an accept are one
    array access each, whatever the window size (a shifted bitmap of 4096 bits costs a
    big-int copy per packet). Sequence numbers are 32-bit (no ESN).
    """

    __slots__ = ("_ring", "_ring_mask", "size", "top")

    def __init__(self, size: int) -> None:
        if not MIN_REPLAY_WINDOW <= size <= MAX_REPLAY_WINDOW:
            raise PolicyError(
                f"replay window {size} is outside {MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW} (a window of 0 is refused)"
            )
        self.size = size
        self.top = 0
        slots = 1 << (size - 1).bit_length()
        self._ring = array("I", bytes(4 * slots))
        self._ring_mask = slots - 1

    def check(self, seq: int) -> None:
        """Raise ``ReplayDetected`` if ``seq`` was seen or is too old. No state change."""
        top = self.top
        if seq > top:
            return
        if seq == 0 or top - seq >= self.size or self._ring[seq & self._ring_mask] == seq:
            raise ReplayDetected("replayed or too old sequence number")

    def accept(self, seq: int) -> None:
        """Record ``seq`` (which ``check`` passed and whose ICV verified)."""
        self._ring[seq & self._ring_mask] = seq
        if seq > self.top:
            self.top = seq

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, top={self.top})"
