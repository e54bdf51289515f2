"""How many micro-batches a silo keeps in flight (``--micro-batches auto``): enough to cover a round trip.

Without micro-batches a step waits twice for the network: FORWARD -> FORWARD_RESULT and BACKWARD ->
BACKWARD_RESULT, each the round trip plus the trunk's compute. The trunk says its compute time for
each piece in the BACKWARD_RESULT (shared/wire/protocol.py), so from a few such steps the silo knows

    rtt = (wait for the forward result + wait for the backward result - trunk compute) / 2

(network, broker and any queueing at the trunk, both ways) and T, the trunk's compute per step. Cut
into d pieces the trunk works T/d per piece, and a piece in flight covers the next one's trip when

    d >= 1 + rtt / (T / d)      i.e.   d >= 1 / (1 - rtt / T)

(the smallest such d). When rtt >= T no depth covers it: the batch goes row by row (the most
overlap there is). When rtt is under ``NEGLIGIBLE`` of T (loopback), one piece: smaller pieces only
add per-message cost. The depth is measured once, over ``PROBE_STEPS`` steps at depth 1 after the
first (which warms up caches and allocators), and then kept, so the data order and the loss stay
those of a fixed depth.
"""

from __future__ import annotations

import logging
import math
import statistics

log = logging.getLogger("silo")

PROBE_STEPS = 3
NEGLIGIBLE = 0.05


def depth_for(rtt_s: float, trunk_s: float, rows: int) -> int:
    """The smallest number of pieces (1..rows) whose overlap covers ``rtt_s`` of a ``trunk_s`` step."""
    if rows <= 1 or trunk_s <= 0 or rtt_s < NEGLIGIBLE * trunk_s:
        return 1
    if rtt_s >= trunk_s:
        return rows
    return max(1, min(rows, math.ceil(1 / (1 - rtt_s / trunk_s) - 1e-9)))


class DepthProbe:
    """``--micro-batches auto``: depth 1 while it measures, then the depth the measurements call for."""

    def __init__(self, setting: int | str, rows: int) -> None:
        self.rows = rows
        self.fixed = None if setting == "auto" else min(int(setting), rows)
        self.samples: list[tuple[float, float]] = []  # (rtt, trunk compute) per probe step
        self.chosen: int | None = None
        self._skipped_first = False

    @property
    def depth(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return self.chosen or 1

    def observe(self, forward_wait_s: float, backward_wait_s: float, trunk_busy_s: float | None) -> None:
        """One step at depth 1: how long each reply took, and the trunk's compute time it reported."""
        if self.fixed is not None or self.chosen is not None or trunk_busy_s is None:
            return
        if not self._skipped_first:
            self._skipped_first = True
            return
        rtt = max(0.0, (forward_wait_s + backward_wait_s - trunk_busy_s) / 2)
        self.samples.append((rtt, trunk_busy_s))
        if len(self.samples) >= PROBE_STEPS:
            rtt = statistics.median(r for r, _ in self.samples)
            trunk = statistics.median(t for _, t in self.samples)
            self.chosen = depth_for(rtt, trunk, self.rows)
            log.info("micro-batches auto: round trip %.1f ms, trunk %.1f ms per step -> %d micro-batch(es) per step",
                     rtt * 1e3, trunk * 1e3, self.chosen)
