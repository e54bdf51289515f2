"""Serial scheduling: silos take turns one training step each, round-robin, in a fixed order.

A fixed order makes the trunk's sequence of updates deterministic, which is what lets a serial
split run reproduce single-process training exactly. A turn is one step: it starts when the
silo's FORWARD is dispatched and ends when its BACKWARD_RESULT has been routed back. With
micro-batches (``--micro-batches N`` on the silo) a step has N FORWARDs, all sent before its first
BACKWARD: the turn dispatches each of them as it arrives (so the trunk starts a micro-batch as soon
as it lands) and ends when every dispatched one has its BACKWARD_RESULT.
"""

from __future__ import annotations

from collections import deque


class SerialScheduler:
    def __init__(self, order: list[str], max_waiting: int = 64) -> None:
        if not order:
            raise ValueError("serial mode needs at least one silo")
        self.order = list(order)
        self._turn = 0
        self._done: set[str] = set()
        self._waiting: dict[str, deque] = {s: deque() for s in order}
        self.in_flight: str | None = None
        self.max_waiting = max_waiting  # one step (its micro-batches) open per silo: more is misbehaviour
        self._turn_step: int | None = None
        self._outstanding = 0  # FORWARDs of the turn's step dispatched and not yet answered

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

    def submit(self, silo: str, item: object, step: int | None = None) -> bool:
        """Queue a silo's FORWARD until its turn comes; False (refused) when its queue is full."""
        if len(self._waiting[silo]) >= self.max_waiting:
            return False
        self._waiting[silo].append((step, item))
        return True

    def next_dispatch(self) -> tuple[str, object] | None:
        """The FORWARD to send now: the current silo's next one when no turn is open, or another
        micro-batch of the open turn's step."""
        silo = self.current
        if silo is None or not self._waiting[silo]:
            return None
        step = self._waiting[silo][0][0]
        if self.in_flight is None:
            self.in_flight, self._turn_step, self._outstanding = silo, step, 0
        elif self.in_flight != silo or step is None or step != self._turn_step:
            return None
        self._outstanding += 1
        return silo, self._waiting[silo].popleft()[1]

    def step_finished(self, silo: str, whole_turn: bool = True) -> bool:
        """A BACKWARD_RESULT (``whole_turn=False``: one micro-batch answered) or an ERROR (the turn
        is over) was routed back. Returns True when the turn ended."""
        if self.in_flight != silo:
            return True
        self._outstanding -= 1
        if not whole_turn and self._outstanding > 0:
            return False
        self.in_flight = None
        self._advance()
        return True

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

    def silo_back(self, silo: str) -> None:
        """A silo that was skipped (away) takes its turns again."""
        self._done.discard(silo)

    def _advance(self) -> None:
        for _ in range(len(self.order)):
            self._turn = (self._turn + 1) % len(self.order)
            if self.order[self._turn] not in self._done:
                return
