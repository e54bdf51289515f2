"""Client-batch scheduling: one step's FORWARDs from several silos become one trunk batch.

A step's batch closes when every active silo has sent its FORWARD for that step, when it holds
``max_silos`` members, or when ``window_s`` has passed since its first FORWARD. A FORWARD that
arrives after its step's batch has gone is a straggler: the silo skips that step and rejoins at
the next one. Steps are batched in order; silos that have left are no longer waited for.

With micro-batches a silo sends its step as several FORWARDs, all but the last flagged "more"
(shared/wire/header.py FLAG_MORE). The k-th piece of every silo goes into the step's k-th batch, so
each trunk batch holds one piece per silo, and silos may cut their steps into different numbers of
pieces: once a silo's last piece is in, the step's later batches stop waiting for it. Batches leave
in (step, piece) order. The trunk adds up a step's batches into one update (trunk_worker/
client_batch_steps.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.wire.protocol import ErrorReason, Reason

MAX_PIECES = 1024  # micro-batches of one step: a silo's batch rows bound it; more is a broken peer


@dataclass
class OpenBatch:
    step: int
    opened_at: float
    members: dict[str, object] = field(default_factory=dict)  # silo -> its FORWARD frames
    piece: int = 0  # which micro-batch of the step (0 without micro-batches)


class BatchWindow:
    def __init__(self, silos: list[str], window_s: float, max_silos: int = 0, start_barrier_s: float = 120.0) -> None:
        self.silos = list(silos)
        self.window_s = window_s
        self.max_silos = max_silos or len(silos)
        self.open: list[OpenBatch] = []  # in arrival order; a step with > max_silos silos has several
        self.dispatched: dict[tuple[int, int], set[str]] = {}  # (step, piece) -> silos whose FORWARD has gone
        self.pieces: dict[tuple[str, int], int] = {}  # (silo, step) -> its FORWARDs of the step so far
        self.last_piece: dict[tuple[str, int], int] = {}  # (silo, step) -> how many pieces, once the last is in
        self.expired: set[int] = set()  # steps whose batch left on its window: late FORWARDs are stragglers
        self.left: set[str] = set()
        self.registered: set[str] = set()
        # Processes start seconds apart: no batch closes on its window before every member silo
        # has registered (or this long has passed), or the first steps would drop the slow starters.
        self._barrier_until = time.monotonic() + start_barrier_s

    @property
    def waiting(self) -> int:
        return sum(len(b.members) for b in self.open)

    def submit(self, silo: str, step: int, frames: object, last: bool = True) -> ErrorReason | None:
        """Queue a FORWARD (``last``: the step's last piece); returns why it is refused, or None."""
        key = (silo, step)
        if key in self.last_piece:
            return ErrorReason.of(Reason.DUPLICATE, f"duplicate FORWARD for step {step}")
        if step in self.expired:
            return ErrorReason.of(Reason.STRAGGLER, f"step {step}'s trunk batch left without this silo; "
                                                    "rejoin at the next step")
        piece = self.pieces.get(key, 0)
        if piece >= MAX_PIECES:
            return ErrorReason("queue_full", f"more than {MAX_PIECES} micro-batches in step {step}")
        batch = next((b for b in self.open if (b.step, b.piece) == (step, piece) and len(b.members) < self.max_silos),
                     None)
        if batch is None:
            batch = OpenBatch(step, time.monotonic(), piece=piece)
            self.open.append(batch)
        batch.members[silo] = frames
        self.pieces[key] = piece + 1
        if last:
            self.last_piece[key] = piece + 1
        return None

    def forget(self, silo: str) -> None:
        """``silo`` will send its open step again (its trunk worker died): its pieces so far are void."""
        for sent in self.dispatched.values():
            sent.discard(silo)
        for key in [k for k in self.pieces if k[0] == silo]:
            self.pieces.pop(key)
            self.last_piece.pop(key, None)

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
        for batch in sorted(self.open, key=lambda b: (b.step, b.piece, b.opened_at)):
            key = (batch.step, batch.piece)
            expected = {s for s in active if self.last_piece.get((s, batch.step), batch.piece + 1) > batch.piece}
            outstanding = expected - self.dispatched.get(key, set())
            full = len(batch.members) >= self.max_silos or outstanding <= batch.members.keys()
            expired = not barrier and now - batch.opened_at >= self.window_s
            if not (full or expired):
                break  # later steps wait for this one: the trunk applies steps in order
            if expired and not full:
                self.expired.add(batch.step)
            self.open.remove(batch)
            self.dispatched.setdefault(key, set()).update(batch.members)
            out.append(batch)
        if out:
            self._forget_before(out[-1].step - 4)
        return out

    def _forget_before(self, step: int) -> None:
        for table in (self.dispatched, self.pieces, self.last_piece):
            for old in [k for k in table if (k[0] if table is self.dispatched else k[1]) < step]:
                table.pop(old)
        self.expired = {s for s in self.expired if s >= step}
