"""Replay protection of sealed frames: a sliding window over nonce counters (RFC 4303 style)."""

from __future__ import annotations


class ReplayWindow:
    """Sliding window over counters (RFC 4303 style): accept new ones, reject duplicates/too-old."""

    __slots__ = ("size", "top", "bits")

    def __init__(self, size: int = 64) -> None:
        self.size, self.top, self.bits = size, 0, 0  # counters start at 1: top=0 means none yet

    def problem(self, counter: int) -> str | None:
        if counter > self.top:
            return None
        behind = self.top - counter
        if behind >= self.size:
            return f"counter {counter} is older than the window (top {self.top})"
        if (self.bits >> behind) & 1:
            return f"counter {counter} already seen"
        return None

    def record(self, counter: int) -> None:
        if counter > self.top:
            shift = counter - self.top
            # Guard the shift: a jump of 2**32 must not build a 2**32-bit integer.
            self.bits = 1 if shift >= self.size else ((self.bits << shift) | 1) & ((1 << self.size) - 1)
            self.top = counter
        else:
            self.bits |= 1 << (self.top - counter)
