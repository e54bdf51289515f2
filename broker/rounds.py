"""The broker's side of a round's end: the barrier, secure aggregation, checkpoints, the commit.

The broker is the aggregator but only ever adds masked vectors (shared/crypto/secure_agg.py):

1. silos send AGG_JOIN when their steps of round r are done;
2. once every active silo has joined (or ``timeout_s`` after the first join) the set is fixed:
   the trunk workers get ROUND_END (average the trunk adapters if asked, checkpoint the round),
   and with aggregation on each participant gets AGG_START(participants, attempt);
3. participants send masked AGG_UPLOADs; when all are in (the commit point) and every worker has
   answered ROUND_DONE, participants get the sum (AGG_RESULT), other joined silos ROUND_CLOSED;
4. a participant that drops before the commit point is excluded: a new attempt starts with the
   others, who mask again (their masks depend on the exact set and the attempt);
5. each silo checkpoints and says CHECKPOINTED; when all have, round r is committed in Redis:
   every role holds a checkpoint of it, and a restart anywhere resumes from there.

A silo joining after the set was fixed gets ROUND_CLOSED at once and keeps its own weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shared.crypto import secure_agg
from shared.wire.control_text import AggAttempt, AggStart
from shared.wire.protocol import Kind
from shared.wire.wire import Message

log = logging.getLogger("broker")


@dataclass
class RoundState:
    round: int
    first_join: float
    joined: dict[str, int] = field(default_factory=dict)  # silo -> weight (sample count)
    participants: list[str] | None = None
    attempt: int = 0
    uploads: dict[str, torch.Tensor] = field(default_factory=dict)
    trunk_pending: bool = False
    closed: bool = False  # results sent; waiting for the silos' checkpoints
    checkpointed: set[str] = field(default_factory=set)


class RoundAggregator:
    def __init__(self, run_id: str, timeout_s: float, send: Callable[[str, Message], None],
                 start_trunk_sync: Callable[[int, dict[str, int]], bool], on_committed: Callable[[int], None],
                 aggregate: bool = True, peer_keys: Callable[[list[str]], torch.Tensor] | None = None) -> None:
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.aggregate = aggregate
        self.send = send  # (silo, message)
        self.start_trunk_sync = start_trunk_sync  # ROUND_END to the workers; True: wait for ROUND_DONEs
        self.on_committed = on_committed
        self.peer_keys = peer_keys  # the participants' keys for AGG_START (silos reach no directory themselves)
        self.rounds: dict[int, RoundState] = {}

    def join(self, silo: str, rnd: int, weight: int, active: set[str]) -> None:
        state = self.rounds.setdefault(rnd, RoundState(rnd, time.monotonic()))
        if state.participants is not None:
            log.warning("round %d: %s joined after the round was fixed; it keeps its weights", rnd, silo)
            self.send(silo, Message(Kind.ROUND_CLOSED, self.run_id, silo, rnd, text="late"))
            return
        state.joined[silo] = weight
        self.tick(active)

    def upload(self, silo: str, rnd: int, attempt: int, vector: torch.Tensor) -> str | None:
        """Store a masked upload; returns a refusal reason, or None."""
        state = self.rounds.get(rnd)
        if state is None or state.participants is None or silo not in state.participants:
            return f"not a participant of round {rnd}'s aggregation"
        if attempt != state.attempt:
            return f"upload for attempt {attempt}, the current one is {state.attempt}"
        sizes = {u.numel() for u in state.uploads.values()}
        if sizes and vector.numel() not in sizes:
            self.drop(silo, f"upload of {vector.numel()} elements, others have {sizes.pop()}")
            return "upload size differs from the other participants'"
        state.uploads[silo] = vector
        self._maybe_finish(state)
        return None

    def trunk_done(self, rnd: int) -> None:
        state = self.rounds.get(rnd)
        if state is not None and state.trunk_pending:
            state.trunk_pending = False
            self._maybe_finish(state)

    def checkpointed(self, silo: str, rnd: int) -> None:
        state = self.rounds.get(rnd)
        if state is not None:
            state.checkpointed.add(silo)
            self._maybe_commit(state)

    def drop(self, silo: str, why: str) -> None:
        """``silo`` left or went silent: exclude it from any round not yet committed."""
        for state in list(self.rounds.values()):
            state.joined.pop(silo, None)
            state.checkpointed.discard(silo)
            if state.closed:
                self._maybe_commit(state)
                continue
            if state.participants is None or silo not in state.participants:
                continue
            state.participants.remove(silo)
            state.uploads.clear()
            if not self.aggregating(state):
                self._maybe_finish(state)
                continue
            state.attempt += 1
            log.warning("round %d: %s dropped before the commit point (%s); attempt %d with %s",
                        state.round, silo, why, state.attempt, ",".join(state.participants))
            self._start_attempt(state)

    def tick(self, active: set[str]) -> None:
        """Fix the participant set of rounds whose silos have all joined, or that timed out."""
        now = time.monotonic()
        for state in list(self.rounds.values()):
            if state.participants is not None:
                continue
            everyone = active <= state.joined.keys()
            if not (everyone or now - state.first_join >= self.timeout_s):
                continue
            state.participants = sorted(state.joined)
            if not everyone:
                log.warning("round %d: closing without %s (not joined within %.0fs)", state.round,
                            ",".join(sorted(active - state.joined.keys())), self.timeout_s)
            if self.aggregating(state):
                self._start_attempt(state)
            state.trunk_pending = self.start_trunk_sync(state.round, dict(state.joined))
            self._maybe_finish(state)

    def aggregating(self, state: RoundState) -> bool:
        return self.aggregate and len(state.participants or ()) >= secure_agg.MIN_PARTICIPANTS

    def _maybe_finish(self, state: RoundState) -> None:
        if state.participants is None or state.trunk_pending or state.closed:
            return
        summed: set[str] = set()
        if self.aggregating(state):
            if state.uploads.keys() != set(state.participants):
                return
            total = secure_agg.sum_uploads([state.uploads[s] for s in state.participants])
            for s in state.participants:
                self.send(s, Message(Kind.AGG_RESULT, self.run_id, s, state.round,
                                     text=AggAttempt(state.attempt).to_text(), tensors=[total]))
            summed = set(state.participants)
            log.info("round %d aggregated over %d silos (attempt %d)", state.round, len(summed), state.attempt)
        for s in sorted(state.joined.keys() - summed):
            self.send(s, Message(Kind.ROUND_CLOSED, self.run_id, s, state.round))
        state.closed = True
        self._maybe_commit(state)

    def _maybe_commit(self, state: RoundState) -> None:
        if state.closed and state.checkpointed >= state.joined.keys():
            self.rounds.pop(state.round, None)
            self.on_committed(state.round)

    def _start_attempt(self, state: RoundState) -> None:
        keys = [] if self.peer_keys is None else [self.peer_keys(list(state.participants))]
        for silo in state.participants:
            self.send(silo, Message(Kind.AGG_START, self.run_id, silo, state.round,
                                    text=AggStart(state.attempt, tuple(state.participants)).to_text(), tensors=keys))
