"""Hierarchical mode: which trunk worker serves which silo.

Sticky: a silo stays on its worker (which holds its trunk adapter and optimizer state) for the
whole run. New silos go to the worker serving the fewest silos. When a worker dies its silos move
to the least-loaded live workers, which start them from the last averaged trunk adapter. Every
assignment is recorded in Redis, so an operator can see it (`splitfed status`, `redis-cli`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("broker")


class Assignment:
    def __init__(self, record: Callable[[str, str], None]) -> None:
        self.record = record  # (silo, worker) -> Redis, off the broker's poll loop
        self.of: dict[str, str] = {}

    def worker_for(self, silo: str, live: list[str]) -> str | None:
        current = self.of.get(silo)
        if current in live:
            return current
        if not live:
            return None
        load = {w: 0 for w in live}
        for w in self.of.values():
            if w in load:
                load[w] += 1
        chosen = min(sorted(live), key=lambda w: load[w])
        self.of[silo] = chosen
        self.record(silo, chosen)
        if current is not None:
            log.warning("silo %s moved from worker %s to %s", silo, current, chosen)
        else:
            log.info("silo %s assigned to worker %s", silo, chosen)
        return chosen

    def silos_of(self, worker: str) -> list[str]:
        return sorted(s for s, w in self.of.items() if w == worker)
