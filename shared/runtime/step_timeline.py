"""Where a role's step time goes, recorded by the role itself for `splitfed bench step`.

The hot path only adds ``perf_counter`` calls: cumulative counters (socket time, busy time; the
codec's encode/decode/crypto seconds; bytes from RoleMetrics) are snapshotted once per finished
step into a list kept in memory. The silo writes its per-step rows into its results JSON, the
trunk publishes its rows to its Redis hash once, at exit: never a Redis round trip per step.

Per step, from the deltas of the counters:

* ``wall``      -- silo: the whole step; trunk: time between the ends of two steps' backward
* ``io``        -- time inside socket calls (poll/recv/send): transport, and for the silo the wait for
                   the trunk
* ``busy``      -- trunk: time handling messages (decode + compute + encode)
* ``encode``/``decode`` -- codec time, crypto included; ``crypto`` -- time inside the cipher
* ``sent``/``received`` -- bytes through the socket (headers, tags and every frame included)
* ``allocations`` -- large payload buffers the codec had to allocate (0 once its pools are warm)
"""

from __future__ import annotations

import json
import time
from collections import deque
from contextlib import contextmanager

FIELDS = ("io", "busy", "encode", "decode", "crypto", "sent", "received", "allocations")
MAX_ROWS = 2000  # the latest steps only: a long run must not grow a Redis field without bound


class StepTimeline:
    def __init__(self, codec, metrics) -> None:
        self.codec, self.metrics = codec, metrics
        self.io_s = 0.0
        self.busy_s = 0.0
        self.rows: deque[dict] = deque(maxlen=MAX_ROWS)
        self._closing: int | None = None
        self._last = self._totals()
        self._last_t = time.perf_counter()

    @contextmanager
    def io(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.io_s += time.perf_counter() - t0

    @contextmanager
    def busy(self):
        t0 = time.perf_counter()
        yield  # an exception here ends the worker: nothing to count
        self.busy_s += time.perf_counter() - t0
        if self._closing is not None:  # the step's last reply is out: its row ends here
            self.step_done(self._closing)

    def step_started(self) -> None:
        """Silo: count from here (the trunk counts from the end of the previous step)."""
        self._last, self._last_t = self._totals(), time.perf_counter()

    def step_done_after_busy(self, step: int) -> None:
        """Trunk: the step is done, but its reply is still to be encoded and sent inside the current
        ``busy`` block; close its row when that block ends, so the reply counts in this step."""
        self._closing = step

    def step_done(self, step: int) -> dict:
        self._closing = None
        now, totals = time.perf_counter(), self._totals()
        row = {"step": step, "wall": now - self._last_t, **{k: totals[k] - self._last[k] for k in FIELDS}}
        self._last, self._last_t = totals, now
        self.rows.append(row)
        return row

    def _totals(self) -> dict:
        return {"io": self.io_s, "busy": self.busy_s, "encode": self.codec.encode_s, "decode": self.codec.decode_s,
                "crypto": self.codec.crypto_seconds(), "sent": self.metrics.bytes_sent,
                "received": self.metrics.bytes_received, "allocations": self.codec.allocations()}

    def to_json(self) -> str:
        """Rounded to the microsecond: what a Redis hash field or a results file keeps."""
        return json.dumps([{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows])
