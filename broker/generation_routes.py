"""Where a silo's generation frames go: the one trunk worker that holds its KV cache.

Generation runs outside the training scheduler (it trains nothing and holds no turn). Step 0 of a
generation picks a worker: the one the silo is assigned to in hierarchical mode (it holds the silo's
own trunk adapter), else the first registered one by id (deterministic, and in serial mode the same
worker the silo trains with); every later step and the END follow it, since only that worker has
the cache. END forgets the route.
"""

from __future__ import annotations

from shared.wire.protocol import Kind
from shared.wire.wire import Header


class GenerationRoutes:
    def __init__(self) -> None:
        self._worker: dict[str, str] = {}  # silo -> worker id holding its generation cache

    def pick(self, header: Header, workers: dict, assigned: str | None = None) -> object | None:
        """The worker (from ``workers``) for this GENERATE / GENERATE_END, or None when there is none.
        ``assigned``: the worker the silo trains on, preferred for a new generation while it lives."""
        silo = header.silo_id
        if header.kind == Kind.GENERATE and header.step == 0 and workers:
            self._worker[silo] = assigned if assigned in workers else sorted(workers)[0]
        worker_id = self._worker.get(silo)
        if header.kind == Kind.GENERATE_END:
            self._worker.pop(silo, None)
        return workers.get(worker_id) if worker_id is not None else None
