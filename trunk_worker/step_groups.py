"""Client-batch with micro-batches: the trunk batches of one step that add up into one update.

Each silo sends its step in pieces, all but the last flagged "more" (silo_agent/microbatch.py), and
the broker puts the k-th piece of every silo into the step's k-th trunk batch (broker/batch_window.py).
The trunk runs each batch's forward and backward as it comes and accumulates the gradients; the
update (the gradients divided by the number of silos that contributed, as in a step without pieces,
then one optimizer step) waits until every batch of the step is done and every silo seen in the step
has had its last piece. A silo missing from an expired batch (a straggler) is not waited for, and a
group whose batches are all done is applied at its deadline whatever is still missing, so a silo
that gave up on the step mid-way cannot hold the trunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.wire.wire import Message


@dataclass
class StepGroup:
    step: int
    deadline: float
    open: int = 0  # batches forwarded and not yet done
    seen: set[str] = field(default_factory=set)
    last_seen: set[str] = field(default_factory=set)  # silos whose last piece has come
    dropped: set[str] = field(default_factory=set)  # silos a batch went on without
    contributed: set[str] = field(default_factory=set)  # silos with a gradient in the update
    busy_s: float = 0.0  # the trunk's compute time for the step (forwards and backwards)

    def add_batch(self, members: list[Message], deadline: float) -> None:
        self.open += 1
        self.deadline = max(self.deadline, deadline)
        for m in members:
            self.seen.add(m.silo_id)
            if not m.more:
                self.last_seen.add(m.silo_id)

    def complete(self) -> bool:
        return self.open == 0 and not (self.seen - self.last_seen - self.dropped)

    def overdue(self, now: float | None = None) -> bool:
        return self.open == 0 and (time.monotonic() if now is None else now) >= self.deadline


class InOrderReplies:
    """Each silo's BACKWARD_RESULTs of a step leave in the order of its pieces.

    The silo matches the k-th result to its k-th piece, but a later piece's trunk batch can finish
    first (its other members answered sooner), so a result waits here until the silo's earlier
    pieces are answered or given up (a straggler gets an ERROR instead)."""

    def __init__(self) -> None:
        self.order: dict[tuple[str, int], list[int]] = {}  # (silo, step) -> its batches' ids, piece order
        self.held: dict[tuple[str, int], dict[int, Message | None]] = {}

    def expect(self, silo: str, step: int, batch_id: int) -> None:
        self.order.setdefault((silo, step), []).append(batch_id)

    def done(self, silo: str, step: int, batch_id: int, reply: Message | None) -> list[Message]:
        """The batch's reply to the silo (None: none comes); the replies that may leave now, in order."""
        key = (silo, step)
        held = self.held.setdefault(key, {})
        held[batch_id] = reply
        order, out = self.order.get(key, []), []
        while order and order[0] in held:
            reply = held.pop(order.pop(0))
            if reply is not None:
                out.append(reply)
        if not order:
            self.order.pop(key, None)
            self.held.pop(key, None)
        return out

    def clear(self) -> None:
        self.order.clear()
        self.held.clear()
