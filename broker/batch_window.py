"""Client-batch scheduling: one step's FORWARDs from several silos become one trunk batch.

A step's batch closes when every active silo has sent its FORWARD for that step, when it holds
``max_silos`` members, or when ``window_s`` has passed since its first FORWARD. A FORWARD that
arrives after its step's batch has gone is a straggler: the silo skips that step and rejoins at
the next one. Steps are batched in order; silos that have left are no longer waited for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.wire.protocol import ErrorReason, Reason


@dataclass
class OpenBatch:
    step: int
    opened_at: float
    members: dict[str, object] = field(default_factory=dict)  # silo -> its FORWARD frames


class BatchWindow:
    def __init__(self, silos: list[str], window_s: float, max_silos: int = 0, start_barrier_s: float = 120.0) -> None:
        self.silos = list(silos)
        self.window_s = window_s
        self.max_silos = max_silos or len(silos)
        self.open: list[OpenBatch] = []  # in arrival order; a step with > max_silos silos has several
        self.dispatched: dict[int, set[str]] = {}  # step -> silos whose FORWARD has gone to a trunk
        self.expired: set[int] = set()  # steps whose batch left on its window: late FORWARDs are stragglers
        self.left: set[str] = set()
        self.registered: set[str] = set()
        # Processes start seconds apart: no batch closes on its window before every member silo
        # has registered (or this long has passed), or the first steps would drop the slow starters.
        self._barrier_until = time.monotonic() + start_barrier_s

    @property
    def waiting(self) -> int:
        return sum(len(b.members) for b in self.open)

    def submit(self, silo: str, step: int, frames: object) -> ErrorReason | None:
        """Queue a FORWARD; returns why it is refused, or None when accepted."""
        if silo in self.dispatched.get(step, ()) or any(silo in b.members for b in self.open if b.step == step):
            return ErrorReason.of(Reason.DUPLICATE, f"duplicate FORWARD for step {step}")
        if step in self.expired:
            return ErrorReason.of(Reason.STRAGGLER, f"step {step}'s trunk batch left without this silo; "
                                                    "rejoin at the next step")
        batch = next((b for b in self.open if b.step == step and len(b.members) < self.max_silos), None)
        if batch is None:
            batch = OpenBatch(step, time.monotonic())
            self.open.append(batch)
        batch.members[silo] = frames
        return None

    def silo_registered(self, silo: str) -> None:
        self.registered.add(silo)

    def silo_done(self, silo: str) -> None:
        self.left.add(silo)

    def ready(self, now: float | None = None) -> list[OpenBatch]:
        """Batches to dispatch now, oldest step first."""
        now = time.monotonic() if now is None else now
        active = {s for s in self.silos if s not in self.left}
        barrier = now < self._barrier_until and not active <= self.registered
        out = []
        for batch in sorted(self.open, key=lambda b: (b.step, b.opened_at)):
            outstanding = active - self.dispatched.get(batch.step, set())
            full = len(batch.members) >= self.max_silos or outstanding <= batch.members.keys()
            expired = not barrier and now - batch.opened_at >= self.window_s
            if not (full or expired):
                break  # later steps wait for this one: the trunk applies steps in order
            if expired and not full:
                self.expired.add(batch.step)
            self.open.remove(batch)
            self.dispatched.setdefault(batch.step, set()).update(batch.members)
            out.append(batch)
        for old in [s for s in self.dispatched if out and s < out[-1].step - 4]:
            self.dispatched.pop(old)
            self.expired.discard(old)
        return out
