"""Serial scheduling: silos take turns one training step each, round-robin, in a fixed order.

A fixed order makes the trunk's sequence of updates deterministic, which is what lets a serial
split run reproduce single-process training exactly. A turn is one step: it starts when the
silo's FORWARD is dispatched and ends when its BACKWARD_RESULT has been routed back.
"""

from __future__ import annotations

from collections import deque


class SerialScheduler:
    def __init__(self, order: list[str], max_waiting: int = 4) -> None:
        if not order:
            raise ValueError("serial mode needs at least one silo")
        self.order = list(order)
        self._turn = 0
        self._done: set[str] = set()
        self._waiting: dict[str, deque] = {s: deque() for s in order}
        self.in_flight: str | None = None
        self.max_waiting = max_waiting  # a silo has one step open at a time: more is misbehaviour

    @property
    def current(self) -> str | None:
        if len(self._done) == len(self.order):
            return None
        return self.order[self._turn]

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def finished(self) -> bool:
        return self.current is None

    def submit(self, silo: str, item: object) -> bool:
        """Queue a silo's FORWARD until its turn comes; False (refused) when its queue is full."""
        if len(self._waiting[silo]) >= self.max_waiting:
            return False
        self._waiting[silo].append(item)
        return True

    def next_dispatch(self) -> tuple[str, object] | None:
        """The FORWARD to send now, if the silo whose turn it is has one waiting and none is in flight."""
        silo = self.current
        if silo is None or self.in_flight is not None or not self._waiting[silo]:
            return None
        self.in_flight = silo
        return silo, self._waiting[silo].popleft()

    def step_finished(self, silo: str) -> None:
        if self.in_flight != silo:
            return
        self.in_flight = None
        self._advance()

    def silo_done(self, silo: str) -> None:
        """The silo has left (finished or gone): skip it from now on."""
        if silo not in self._waiting:
            return
        self._done.add(silo)
        self._waiting[silo].clear()
        if self.in_flight == silo:
            self.in_flight = None
        if self.order[self._turn] in self._done:
            self._advance()

    def _advance(self) -> None:
        for _ in range(len(self.order)):
            self._turn = (self._turn + 1) % len(self.order)
            if self.order[self._turn] not in self._done:
                return
