"""Forward graphs waiting for their BACKWARD, by (silo, step), oldest first.

A step usually has one graph. With micro-batches (silo_agent/microbatch.py) it has several: the
silo sends all FORWARDs of a step before any of its BACKWARDs, and the BACKWARDs in the same order,
so the k-th BACKWARD of a step belongs to its k-th graph, and when a step has no graph left its
gradients are complete: the worker steps its optimizer then (once per step, however many pieces).
"""

from __future__ import annotations

from collections import OrderedDict, deque

Key = tuple[str, int]


class PendingGraphs:
    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._by_key: OrderedDict[Key, deque] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: Key) -> bool:
        return key in self._by_key

    def add(self, key: Key, graph: tuple) -> list[Key]:
        """Keep ``graph``; returns the keys whose oldest graph was dropped to stay within max_pending."""
        self._by_key.setdefault(key, deque()).append(graph)
        self._count += 1
        dropped = []
        while self._count > self.max_pending:
            old, graphs = next(iter(self._by_key.items()))
            graphs.popleft()
            self._count -= 1
            if not graphs:
                del self._by_key[old]
            dropped.append(old)
        return dropped

    def first(self, key: Key) -> tuple:
        return self._by_key[key][0]

    def pop(self, key: Key) -> tuple[tuple, bool]:
        """The key's oldest graph, and whether it was the step's last one."""
        graphs = self._by_key[key]
        graph = graphs.popleft()
        self._count -= 1
        if not graphs:
            del self._by_key[key]
        return graph, not graphs

    def clear(self) -> None:
        """Forget every graph (a rollback abandons the steps in flight)."""
        self._by_key.clear()
        self._count = 0
