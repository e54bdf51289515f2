"""Rounds and recovery: the scheduling state a round starts from, committing a round once every
role has checkpointed it, rolling every peer back to it when one restarts, the trunk's round ends."""

from __future__ import annotations

import logging
from broker.rounds import RoundAggregator
from broker.schedules import replay_membership
from broker.trunk_rounds import TrunkRounds
from shared.runtime import failpoints
from shared.wire.control_text import ResumePoint
from shared.wire.protocol import Kind
from shared.wire.wire import Message

log = logging.getLogger("broker")


class BrokerRecovery:
    """Part of Broker (broker/broker.py): round commits, rollbacks, the end of the run."""

    def _finish_run(self) -> None:
        """Every silo has left: the run is over. Workers are told (a --burst worker exits), and a
        --burst broker stops once those messages are out."""
        self.writes.call("finish the rounds", self.registry.finish_rounds)
        for worker in self.workers.values():
            self._send(self.backend, worker.identity, Message(Kind.DISCONNECT, self.run_id, worker.worker_id))
        log.info("every silo has finished: the run is over")
        if self.settings.burst:
            self._stopping = True

    def _reset_schedule(self) -> None:
        """Fresh scheduling state: at start, and when the run rolls back to a committed round."""
        s = self.settings
        self.schedule.reset()
        replay_membership(self.schedule, registered=self.silo_identity, gone=self.left | self.away)
        self.routes.holder.clear()
        self.rounds = RoundAggregator(self.run_id, s.round_timeout_s, self._send_to_silo, self._start_trunk_sync,
                                      self._commit_round, aggregate=s.aggregation == "fedavg",
                                      peer_keys=self.records.peer_keys)
        self.trunk_rounds = TrunkRounds()

    def _commit_round(self, rnd: int) -> None:
        """Every silo and worker has a checkpoint of round ``rnd``: recovery restarts from here."""
        if rnd <= self.committed_round:
            return
        if self.trunk_rounds.blocks_commit(rnd):
            log.warning("round %d not committed: no trunk worker checkpointed it; recovery restarts from round %d",
                        rnd, self.committed_round)
            return
        if rnd == 0 and failpoints.armed("uncommitted-hello"):
            # Test hook: leave round 0 uncommitted until a silo's round-1 session is acknowledged,
            # then stop there (the recovery test kills the broker in exactly this window).
            self._held_commit = rnd
            return
        self.committed_round = rnd
        self.writes.call(f"commit round {rnd}", self.registry.commit_round, rnd)
        log.info("round %d committed", rnd)

    def _rollback(self, why: str, exclude: str | None = None) -> None:
        rnd = self.committed_round
        log.warning("ROLLBACK to the end of round %d: %s", rnd, why)
        self.writes.call("count the rollback", self.registry.count_rollback)
        self._reset_schedule()
        self.latest_hello.clear()  # every silo handshakes again after the rollback: old hellos are stale
        self.acked.clear()
        for silo, identity in self.silo_identity.items():
            if silo != exclude and silo not in self.left:
                self.rolling_back.add(silo)
                self._send(self.frontend, identity, Message(Kind.ROLLBACK, self.run_id, silo, text=ResumePoint(rnd).to_rollback_text()))
        for worker in self.workers.values():
            if worker.worker_id != exclude:
                self.rolling_back.add(worker.worker_id)
                self._send(self.backend, worker.identity, Message(Kind.ROLLBACK, self.run_id, worker.worker_id,
                                                                  text=ResumePoint(rnd).to_rollback_text()))

    def _reset_schedule_for_return(self, silo: str) -> None:
        self.schedule.silo_back(silo)

    def _start_trunk_sync(self, rnd: int, weights: dict[str, int]) -> bool:
        """ROUND_END to every worker: checkpoint the round, after averaging the trunk adapters of the
        participating silos (hierarchical, unless --personalize). True when there are ROUND_DONEs to wait for."""
        workers = sorted(self._ready_workers())
        averaging = self.schedule.averaging_workers(weights, workers) if workers else []
        # no worker now: the round is orphaned (it closes for the silos but never commits)
        self._send_round_ends(rnd, self.trunk_rounds.start(rnd, workers, averaging, weights))
        return bool(workers)

    def _send_round_ends(self, rnd: int, round_ends: list[tuple[str, str | None]]) -> None:
        for w, text in round_ends:
            if w in self.workers:
                self._send(self.backend, self.workers[w].identity, Message(Kind.ROUND_END, self.run_id, w, rnd, text=text))
