"""The broker's Redis writes, off its poll loop.

The broker routes every frame of the run from one thread; a Redis that is slow, paused or
restarting must not stall that thread, and a flood of garbage frames must not turn into a flood
of Redis round trips. So the loop only records what to write, and one background thread writes
it: rejected-frame counters coalesce in memory (one HINCRBY per reason per flush, however many
frames), other writes (round commits, rollbacks, assignments) keep their order and are retried
until Redis takes them. ``close`` flushes what is left before the broker exits.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable

from redis import RedisError
from redis.exceptions import NoPermissionError

from shared.state.registry import Registry

log = logging.getLogger("broker")


class RedisWrites:
    def __init__(self, registry: Registry, flush_s: float = 0.2) -> None:
        self.registry = registry
        self.flush_s = flush_s
        self._counts: Counter[str] = Counter()
        self._calls: deque[tuple[str, Callable, tuple]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="broker-redis-writes", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called by the poll loop
    def count_rejected(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] += n

    def call(self, what: str, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` in the writer thread, after every write submitted before it."""
        with self._lock:
            self._calls.append((what, fn, args))
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._calls) + len(self._counts)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (waiting at most ``timeout_s`` for Redis), then stop the thread."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)
        if left := self.pending():
            log.warning("%d Redis writes could not be made before exit (Redis unavailable)", left)

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        failing = False
        while True:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            try:
                self._flush()
                if failing:
                    log.info("Redis writes resumed")
                failing = False
            except RedisError as exc:  # everything stays queued; tried again at the next flush
                if not failing:
                    log.warning("Redis unavailable for the broker's writes (kept, retried): %s", exc)
                failing = True
            if self._closing and not self.pending():
                return  # (with Redis down at exit, close() stops waiting after its timeout)

    def _flush(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    break
                what, fn, args = self._calls[0]
            try:
                fn(*args)
            except NoPermissionError as exc:  # no retry makes it allowed: say so, drop that write
                log.error("Redis write %r refused: the broker's Redis user lacks a permission (%s)", what, exc)
            except RedisError:
                raise  # the call stays first in line
            except Exception:  # a bug must not kill the writer: say so, drop that write
                log.exception("Redis write %r failed", what)
            with self._lock:
                self._calls.popleft()
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            self.registry.count_rejected_many(counts)
        except RedisError:
            with self._lock:
                self._counts.update(counts)
            raise
