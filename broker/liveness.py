"""Who is still there: the broker's periodic checks (round timeouts, silent silos, dead workers),
its heartbeats to every peer, and purging a dead worker (its open steps are sent again)."""

from __future__ import annotations

import logging
import time

import zmq

from shared.wire.protocol import ErrorReason, Kind, Reason
from shared.wire.wire import Message, message_to_wire

log = logging.getLogger("broker")


class PeerLiveness:
    """Part of Broker (broker/broker.py): liveness of silos and workers (Paranoid Pirate)."""

    def _tick(self) -> None:
        """Round timeouts, silent silos and dead workers: about once a heartbeat, never per step."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + min(self.settings.heartbeat_s, 0.5)
        for state in list(self.rounds.rounds.values()):
            for silo in list(state.participants or ()):
                if now - self.silo_seen.get(silo, now) > self.settings.liveness_ttl_s:
                    self.rounds.drop(silo, f"silent for {self.settings.liveness_ttl_s}s")
        self._mark_away(now)
        self.rounds.tick(self._active_silos())
        if now >= self._next_beat:
            self._next_beat = now + self.settings.heartbeat_s
            self._heartbeat_peers()
        # Liveness over ZeroMQ (Paranoid Pirate): a worker heartbeats every heartbeat_s from its
        # loop, so silence past liveness_ttl_s means it is dead (or stuck in one step that long).
        for worker_id in [w for w in self.workers if now - self.worker_seen.get(w, now) > self.settings.liveness_ttl_s]:
            self._purge_worker(worker_id)

    def _alive(self, identity: bytes, readmit: bool) -> str | None:
        """The worker on connection ``identity``, seen alive now (its loop or its beacon beats).
        With ``readmit`` a purged one comes back: it was only slow (e.g. a starved CPU)."""
        worker = next((w for w in self.workers.values() if w.identity == identity), None)
        if worker is None and readmit:
            worker = next((w for w in self.purged.values() if w.identity == identity), None)
            if worker is not None:
                log.warning("trunk worker %s is alive again: readmitted", worker.worker_id)
                self.workers[worker.worker_id] = self.purged.pop(worker.worker_id)
                for rnd, round_ends in self.trunk_rounds.readmitted(worker.worker_id).items():
                    self._send_round_ends(rnd, round_ends)
        if worker is None:
            return None
        self.worker_seen[worker.worker_id] = time.monotonic()
        return worker.worker_id

    def _heartbeat_peers(self) -> None:
        """Tell every registered silo and worker the broker is alive: a peer that hears nothing for
        a few heartbeats knows the broker is down (it does not wait for its step timeout)."""
        for silo, identity in self.silo_identity.items():
            if silo not in self.left:
                self._beat(self.frontend, identity, silo)
        now = time.monotonic()
        self.records.alive([s for s in self.silo_identity if s not in self.left
                            and now - self.silo_seen.get(s, 0.0) < self.settings.liveness_ttl_s])
        for worker in self.workers.values():
            self._beat(self.backend, worker.identity, worker.worker_id)

    def _beat(self, sock: zmq.Socket, identity: bytes, peer: str) -> None:
        try:  # quietly: a peer that is gone is judged by its own silence, not by this send
            sock.send_multipart([identity, *message_to_wire(Message(Kind.HEARTBEAT, self.run_id, peer))],
                                flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _mark_away(self, now: float) -> None:
        """A member silo silent (or absent) for round_timeout_s no longer holds the others up."""
        limit = self.settings.round_timeout_s
        for silo in self._active_silos():
            last = self.silo_seen.get(silo, self.started_at)
            if now - last > limit:
                log.warning("silo %s silent for %.0fs: the run goes on without it until it registers again", silo, limit)
                self.away.add(silo)
                self._unschedule(silo)
                self.rounds.drop(silo, "away")

    def _unschedule(self, silo: str) -> None:
        """``silo`` left or went away: the schedule stops waiting for it."""
        self.schedule.silo_gone(silo)

    def _purge_worker(self, worker_id: str) -> None:
        log.warning("trunk worker %s is dead (silent for %ss): purging it", worker_id, self.settings.liveness_ttl_s)
        self.purged[worker_id] = self.workers.pop(worker_id)
        for silo, w in list(self.routes.holder.items()):
            if w != worker_id:
                continue
            del self.routes.holder[silo]  # its open step is lost: the silo sends it again
            self.schedule.step_lost(silo)
            self._send_to_silo(silo, Message(Kind.ERROR, self.run_id, silo,
                                             text=ErrorReason.of(Reason.RETRY, f"trunk worker {worker_id} lost").to_text()))
        its_silos = self.schedule.worker_lost(worker_id, sorted(self._ready_workers()))
        finished, resend = self.trunk_rounds.worker_lost(worker_id, its_silos)
        for rnd, round_ends in resend.items():
            self._send_round_ends(rnd, round_ends)
        for rnd in finished:
            self.rounds.trunk_done(rnd)
