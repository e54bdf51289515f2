"""Prometheus metrics of a role, served on ``--metrics-port`` (off by default).

Each role has its own CollectorRegistry (no process-global state, so tests can make several).
Names follow Prometheus conventions; every series carries the role and its id as labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def frames_nbytes(frames: Iterable) -> int:
    total = 0
    for f in frames:
        total += len(f) if not isinstance(f, memoryview) else f.nbytes
    return total


class RoleMetrics:
    def __init__(self, role: str, member: str, port: int | None, addr: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        labels = {"role": role, "id": member}
        names = list(labels)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, names + list(extra), registry=self.registry)

        self._steps = counter("splitfed_steps", "training steps completed (trunk: updates applied)")
        self._step_s = Histogram("splitfed_step_seconds", "time of one step (silo: whole step; trunk: forward+backward)",
                                 names, buckets=STEP_BUCKETS, registry=self.registry)
        self._sent = counter("splitfed_bytes_sent", "bytes sent on ZeroMQ sockets")
        self._received = counter("splitfed_bytes_received", "bytes received on ZeroMQ sockets")
        self._rejected = counter("splitfed_rejected_frames", "frames rejected, by reason", ("reason",))
        self._queue = Gauge("splitfed_queue_depth", "work waiting (broker: FORWARDs; trunk: open graphs)", names,
                            registry=self.registry)
        self._labels = labels
        # Plain totals beside the Prometheus series: `splitfed bench step` reads bytes per step.
        self.bytes_sent = 0
        self.bytes_received = 0
        self.port = None
        if port is not None:
            server, _ = start_http_server(port, addr=addr, registry=self.registry)
            self.port = server.server_port
            log.info("metrics on http://%s:%d/metrics", addr, self.port)

    def step(self, seconds: float) -> None:
        self._steps.labels(**self._labels).inc()
        self._step_s.labels(**self._labels).observe(seconds)

    def sent(self, frames: Iterable) -> None:
        n = frames_nbytes(frames)
        self.bytes_sent += n
        self._sent.labels(**self._labels).inc(n)

    def received(self, frames: Iterable) -> None:
        n = frames_nbytes(frames)
        self.bytes_received += n
        self._received.labels(**self._labels).inc(n)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(**self._labels, reason=reason).inc()

    def queue_depth(self, n: int) -> None:
        self._queue.labels(**self._labels).set(n)
