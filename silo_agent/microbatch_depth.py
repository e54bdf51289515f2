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
add per-message cost. The rule counts the network only, so the depth it gives is tried for
``PROBE_STEPS`` steps and kept only if the silo's median step got shorter than at depth 1 (on a few
shared CPU cores pieces can cost more than they hide: reports/perf/wan.md). All is measured once, at
the start of the run (steps 1-3 at depth 1, the first warming up caches and allocators; 4-6 the
trial), and then kept. Every depth gives the same update up to float rounding.
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
    """``--micro-batches auto``: depth 1 while it measures, then a trial of the depth the measurements
    call for, kept only if it shortens the silo's steps.

    The trial is there because the rule counts the network only: where the silo and the trunk share
    a few CPU cores, or a piece is too small for the trunk's device to be efficient, pieces in
    flight can make a step slower however much round trip they hide.
    """

    def __init__(self, setting: int | str, rows: int) -> None:
        self.rows = rows
        self.fixed = None if setting == "auto" else min(int(setting), rows)
        self.samples: list[tuple[float, float, float]] = []  # (rtt, trunk compute, step time) at depth 1
        self.trial: int | None = None
        self.trial_steps: list[float] = []
        self.chosen: int | None = None
        self._skipped_first = False

    @property
    def depth(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return self.chosen or self.trial or 1

    def observe(self, depth: int, step_s: float, waits: tuple[float, float] | None,
                trunk_busy_s: float | None) -> None:
        """One step at ``depth``: its time, at depth 1 how long each reply took (forward, backward),
        and the trunk's compute time it reported (None: a trunk that does not say)."""
        if self.fixed is not None or self.chosen is not None:
            return
        if not self._skipped_first:  # the first step warms up caches and allocators
            self._skipped_first = True
            return
        if self.trial is None:
            if waits is None or trunk_busy_s is None:
                self.chosen = 1
                log.info("micro-batches auto: the trunk does not report its compute time -> 1 micro-batch per step")
                return
            rtt = max(0.0, (sum(waits) - trunk_busy_s) / 2)
            self.samples.append((rtt, trunk_busy_s, step_s))
            if len(self.samples) < PROBE_STEPS:
                return
            rtt, trunk = (statistics.median(x[i] for x in self.samples) for i in (0, 1))
            candidate = depth_for(rtt, trunk, self.rows)
            log.info("micro-batches auto: round trip %.1f ms, trunk %.1f ms per step -> %s", rtt * 1e3, trunk * 1e3,
                     f"trying {candidate} micro-batches per step" if candidate > 1 else "1 micro-batch per step")
            if candidate == 1:
                self.chosen = 1
            else:
                self.trial = candidate
            return
        if depth != self.trial:
            return
        self.trial_steps.append(step_s)
        if len(self.trial_steps) < PROBE_STEPS:
            return
        with_pieces = statistics.median(self.trial_steps)
        without = statistics.median(x[2] for x in self.samples)
        self.chosen = self.trial if with_pieces < without else 1
        log.info("micro-batches auto: a step took %.3f s with %d micro-batches, %.3f s with 1 -> keeping %d",
                 with_pieces, self.trial, without, self.chosen)
