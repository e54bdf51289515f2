"""The broker's side of a round's end on the trunk: ROUND_END out, TRUNK_SYNC relayed, ROUND_DONE in.

Every ready worker checkpoints the round; in hierarchical mode (unless --personalize) the workers
holding participating silos also average their trunk adapters, by relaying sealed partial sums
through the broker. A worker that dies in the middle must not stall the round: the survivors are
sent ROUND_END again, without the dead worker and without the silos whose adapters died with it
(those silos restart from the average on their new worker).

A round commits only once some worker has checkpointed it. When the last worker that could dies
first (serial and client-batch have one trunk state, held by one worker), or there is no worker at
all when the round ends, the round is *orphaned*: the silos' round still closes (nobody waits for a
dead worker), but it never commits, because no trunk could be restored to it: a restarted worker
rolls the run back past it. A purged worker that comes back (it was only slow, its state intact) is
sent ROUND_END for each orphaned round; its ROUND_DONE ends the orphan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from shared.wire.control_text import RoundEnd

log = logging.getLogger("broker")


@dataclass
class TrunkRound:
    pending: set[str]  # workers yet to say ROUND_DONE
    averaging: list[str]  # workers whose partial sums make the average
    weights: dict[str, int]  # silo -> samples, the FedAvg weights
    relayed: set[str] = field(default_factory=set)  # workers whose partial went out to the others
    done: set[str] = field(default_factory=set)  # workers that checkpointed the round

    @property
    def orphaned(self) -> bool:
        """No worker holds the round or will: it cannot commit."""
        return not self.pending and not self.done


class TrunkRounds:
    def __init__(self) -> None:
        self.rounds: dict[int, TrunkRound] = {}

    def start(self, rnd: int, workers: list[str], averaging: list[str],
              weights: dict[str, int]) -> list[tuple[str, str | None]]:
        """The ROUND_ENDs to send: (worker, text); text None means checkpoint only. With no
        ``workers`` the round is orphaned (see the module's doc)."""
        self.rounds[rnd] = TrunkRound(set(workers), list(averaging), dict(weights))
        if not workers:
            log.warning("round %d ended with no trunk worker to checkpoint it: it will not commit", rnd)
        text = RoundEnd(tuple(averaging), dict(weights)).to_text()
        return [(w, text if w in averaging else None) for w in sorted(workers)]

    def relay_targets(self, rnd: int, sender: str) -> list[str]:
        """A partial sum from ``sender``: the averaging workers to pass it to (itself included)."""
        state = self.rounds.get(rnd)
        if state is None or sender not in state.averaging:
            return []
        state.relayed.add(sender)
        return list(state.averaging)

    def done(self, rnd: int, worker: str) -> bool:
        """``worker`` closed round ``rnd``; True when it was the last one."""
        state = self.rounds.get(rnd)
        if state is None:
            return False
        state.pending.discard(worker)
        state.done.add(worker)  # an orphan's too: a readmitted worker checkpointed it
        if state.pending:
            return False
        del self.rounds[rnd]
        return True

    def worker_lost(self, worker: str, its_silos: set[str]) -> tuple[list[int], dict[int, list[tuple[str, str | None]]]]:
        """``worker`` died holding ``its_silos``' adapters. Returns the rounds now finished, and per
        round the ROUND_ENDs to send again when the survivors still wait for the dead one's partial."""
        finished: list[int] = []
        resend: dict[int, list[tuple[str, str | None]]] = {}
        for rnd, state in list(self.rounds.items()):
            state.pending.discard(worker)
            if worker in state.averaging and worker not in state.relayed:
                # The survivors' averages can never complete: start the averaging again without it.
                averaging = [w for w in state.averaging if w != worker]
                weights = {s: n for s, n in state.weights.items() if s not in its_silos}
                waiting = [w for w in averaging if w in state.pending]
                if not weights:  # nothing left to average: the survivors only checkpoint
                    averaging = []
                state.averaging, state.weights, state.relayed = averaging, weights, set()
                text = RoundEnd(tuple(averaging), dict(weights)).to_text() if averaging else None
                resend[rnd] = [(w, text) for w in waiting]
                log.warning("round %d: worker %s died before its trunk partial; averaging again over %s",
                            rnd, worker, ",".join(averaging) or "nobody")
            if state.orphaned:  # kept, so the commit can see it; the silos' round closes
                log.warning("round %d: worker %s died before checkpointing it, and no other worker has: "
                            "the round will not commit (a restarted worker rolls the run back past it)", rnd, worker)
                finished.append(rnd)
            elif not state.pending:
                del self.rounds[rnd]
                finished.append(rnd)
        return finished, resend

    def blocks_commit(self, rnd: int) -> bool:
        """No trunk checkpoint of ``rnd`` exists or will: committing it would leave nothing to restore."""
        state = self.rounds.get(rnd)
        return state is not None and state.orphaned

    def readmitted(self, worker: str) -> dict[int, list[tuple[str, str | None]]]:
        """A purged ``worker`` is alive again, its state intact: it checkpoints the orphaned rounds."""
        resend = {}
        for rnd, state in self.rounds.items():
            if state.orphaned:  # nothing else in it can be pending: one ROUND_END, checkpoint only
                state.pending.add(worker)
                state.averaging, state.relayed = [], set()
                resend[rnd] = [(worker, None)]
        return resend
