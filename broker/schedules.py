"""What a training mode decides in the broker: when a silo's FORWARD goes to a trunk worker, and to which.

One class per mode behind one interface (``StepSchedule``), so the broker's loop routes frames
without asking which mode it runs:

* ``SerialTurns``          -- serial: silos take turns one step each (broker/serial.py);
* ``ClientBatches``        -- client-batch: one step's FORWARDs from several silos become one trunk
                              batch, a BUNDLE (broker/batch_window.py);
* ``HierarchicalQueue``    -- hierarchical: each silo is served by its own sticky worker
                              (broker/assignment.py), which holds at most ``max_inflight`` open steps;
                              the rest wait here in arrival order.

The broker keeps the parts every mode shares: which worker holds each silo's open step
(``StepRoutes``: its BACKWARD must reach that graph), registration, liveness and recovery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from broker.assignment import Assignment
from broker.batch_window import BatchWindow
from broker.serial import SerialScheduler
from shared.wire.protocol import ErrorReason, Kind
from shared.runtime.settings import BrokerSettings
from shared.wire.wire import Message, bundle_to_wire, header_from_wire

# (worker, the silos whose step this is, the frames to send it) -> sent, and routed back to it
SendStep = Callable[[str, list[str], list], None]


class StepRoutes:
    """Which worker holds each silo's open step, and the round-robin pick for a step anywhere."""

    def __init__(self) -> None:
        self.holder: dict[str, str] = {}  # silo -> worker holding its open step's graph
        self._next = 0

    def round_robin(self, ready: list[str]) -> str:
        self._next += 1
        return ready[(self._next - 1) % len(ready)]

    def open_steps(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for worker in self.holder.values():
            counts[worker] = counts.get(worker, 0) + 1
        return counts


class StepSchedule(Protocol):
    def reset(self) -> None:
        """Forget every queued step (start, and a rollback to the committed round)."""

    def submit(self, silo: str, step: int, frames: list, last: bool = True) -> ErrorReason | None:
        """Queue a silo's FORWARD (``last``: not flagged "more", the step's last micro-batch);
        returns why it is refused, or None when accepted."""

    def dispatch(self, ready: list[str], routes: StepRoutes, send: SendStep) -> None:
        """Send what may go now to the ``ready`` workers (sorted; never empty)."""

    def result_routed(self, silo: str, error: bool) -> bool:
        """A BACKWARD_RESULT (or an ERROR) went back to ``silo``: True when its open step is over."""

    def step_lost(self, silo: str) -> None:
        """``silo``'s open step died with its worker (the silo is told to send it again)."""

    def worker_lost(self, worker: str, live: list[str]) -> set[str]:
        """A worker died: the silos whose state it held (they move to ``live`` workers)."""

    def silo_registered(self, silo: str) -> None: ...

    def silo_gone(self, silo: str) -> None:
        """``silo`` left or went away: stop waiting for it."""

    def silo_back(self, silo: str) -> None:
        """A silo that went away registered again: it takes part from now on."""

    def home_worker(self, silo: str) -> str | None:
        """The worker that holds this silo's own state (its split generation goes there), if any."""

    def averaging_workers(self, weights: dict[str, int], workers: list[str]) -> list[str]:
        """The workers whose trunk adapters are averaged at a round's end (none: no averaging)."""

    @property
    def waiting(self) -> int: ...


class _NoSiloState:
    """Modes whose one trunk serves every silo alike: no per-silo worker, nothing to average."""

    def worker_lost(self, worker: str, live: list[str]) -> set[str]:
        return set()

    def home_worker(self, silo: str) -> str | None:
        return None

    def averaging_workers(self, weights: dict[str, int], workers: list[str]) -> list[str]:
        return []


class SerialTurns(_NoSiloState):
    def __init__(self, silos: list[str]) -> None:
        self.silos = list(silos)
        self.reset()

    def reset(self) -> None:
        self.turns = SerialScheduler(self.silos)

    def submit(self, silo: str, step: int, frames: list, last: bool = True) -> ErrorReason | None:
        # a turn lasts until every dispatched piece is answered: it needs no "last" flag
        if not self.turns.submit(silo, frames, step):
            return ErrorReason("queue_full", f"too many FORWARDs waiting for {silo}'s turn")
        return None

    def dispatch(self, ready: list[str], routes: StepRoutes, send: SendStep) -> None:
        while (turn := self.turns.next_dispatch()) is not None:
            silo, frames = turn
            # a turn's micro-batches go to the worker holding its first graph
            send(routes.holder.get(silo) or routes.round_robin(ready), [silo], frames)

    def result_routed(self, silo: str, error: bool) -> bool:
        # micro-batches: the turn (and the BACKWARD route) lasts until the step's last result
        return self.turns.step_finished(silo, whole_turn=error)

    def step_lost(self, silo: str) -> None:
        self.turns.step_finished(silo)

    def silo_registered(self, silo: str) -> None:
        pass

    def silo_gone(self, silo: str) -> None:
        self.turns.silo_done(silo)

    def silo_back(self, silo: str) -> None:
        self.turns.silo_back(silo)

    @property
    def waiting(self) -> int:
        return self.turns.waiting


class ClientBatches(_NoSiloState):
    def __init__(self, silos: list[str], settings: BrokerSettings) -> None:
        self.silos = list(silos)
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        s = self.settings
        self.window = BatchWindow(self.silos, s.batch_window_ms / 1000, s.batch_max_silos, s.round_timeout_s)
        self._step_worker: tuple[int | None, str | None] = (None, None)
        self.unanswered: dict[str, int] = {}  # silo -> its pieces dispatched and not yet answered

    def submit(self, silo: str, step: int, frames: list, last: bool = True) -> ErrorReason | None:
        return self.window.submit(silo, step, frames, last)

    def dispatch(self, ready: list[str], routes: StepRoutes, send: SendStep) -> None:
        for batch in self.window.ready():
            members = [batch.members[s] for s in sorted(batch.members)]
            first = header_from_wire(members[0][0].buffer, self.settings.max_tensor_bytes)
            bundle = Message(Kind.BUNDLE, self.settings.run_id, "broker", first.round, batch.step)
            # A step's micro-batches add up into one update: they all go to the worker of its first.
            step, worker = self._step_worker
            if step != batch.step or worker not in ready:
                self._step_worker = (batch.step, routes.round_robin(ready))
            send(self._step_worker[1], sorted(batch.members),
                 bundle_to_wire(bundle, [[f.buffer for f in m] for m in members]))
            for silo in batch.members:
                self.unanswered[silo] = self.unanswered.get(silo, 0) + 1

    def result_routed(self, silo: str, error: bool) -> bool:
        # micro-batches: the BACKWARD route lasts until every dispatched piece is answered (an ERROR
        # ends the silo's step: it sends no more BACKWARDs for it)
        left = 0 if error else self.unanswered.get(silo, 1) - 1
        if left > 0:
            self.unanswered[silo] = left
            return False
        self.unanswered.pop(silo, None)
        return True

    def step_lost(self, silo: str) -> None:
        self.window.forget(silo)
        self.unanswered.pop(silo, None)

    def silo_registered(self, silo: str) -> None:
        self.window.silo_registered(silo)

    def silo_gone(self, silo: str) -> None:
        self.window.silo_done(silo)

    def silo_back(self, silo: str) -> None:
        self.window.left.discard(silo)

    @property
    def waiting(self) -> int:
        return self.window.waiting


class HierarchicalQueue:
    def __init__(self, settings: BrokerSettings, assignment: Assignment) -> None:
        self.settings = settings
        self.assignment = assignment  # sticky across rollbacks: a worker keeps its silos' adapters
        self.reset()

    def reset(self) -> None:
        self.held: list[tuple[str, list]] = []  # FORWARDs waiting for their worker, in arrival order

    def submit(self, silo: str, step: int, frames: list, last: bool = True) -> ErrorReason | None:
        self.held.append((silo, frames))  # routed at once by dispatch, to the silo's own worker
        return None

    def dispatch(self, ready: list[str], routes: StepRoutes, send: SendStep) -> None:
        # Each worker keeps at most max_inflight steps' graphs: its memory stays bounded however
        # many silos it serves, and the rest wait here in arrival order.
        open_steps = routes.open_steps()
        held, self.held = self.held, []
        for silo, frames in held:
            worker = self.assignment.worker_for(silo, ready)
            if worker is None or open_steps.get(worker, 0) >= self.settings.max_inflight:
                self.held.append((silo, frames))
                continue
            open_steps[worker] = open_steps.get(worker, 0) + 1
            send(worker, [silo], frames)

    def result_routed(self, silo: str, error: bool) -> bool:
        return True

    def step_lost(self, silo: str) -> None:
        pass

    def worker_lost(self, worker: str, live: list[str]) -> set[str]:
        # its silos move now, so Redis and `splitfed status` say so
        moved = set(self.assignment.silos_of(worker))
        for silo in sorted(moved):
            self.assignment.worker_for(silo, live)
        return moved

    def silo_registered(self, silo: str) -> None:
        pass

    def silo_gone(self, silo: str) -> None:
        pass

    def silo_back(self, silo: str) -> None:
        pass

    def home_worker(self, silo: str) -> str | None:
        return self.assignment.of.get(silo)

    def averaging_workers(self, weights: dict[str, int], workers: list[str]) -> list[str]:
        if self.settings.personalize:
            return []
        return sorted({w for s, w in self.assignment.of.items() if s in weights and w in workers})

    @property
    def waiting(self) -> int:
        return len(self.held)


def schedule_for(settings: BrokerSettings, silos: list[str], record_assignment: Callable[[str, str], None]) -> StepSchedule:
    """The broker's schedule for ``settings.mode`` (``record_assignment``: hierarchical, to Redis)."""
    if settings.mode == "serial":
        return SerialTurns(silos)
    if settings.mode == "client-batch":
        return ClientBatches(silos, settings)
    if settings.mode == "hierarchical":
        return HierarchicalQueue(settings, Assignment(record_assignment))
    raise ValueError(f"unknown mode {settings.mode!r}")


def replay_membership(schedule: StepSchedule, registered: Iterable[str], gone: Iterable[str]) -> None:
    """A fresh (reset) schedule learns who is registered and who is gone."""
    for silo in gone:
        schedule.silo_gone(silo)
    for silo in registered:
        schedule.silo_registered(silo)
