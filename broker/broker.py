"""The ZeroMQ broker: routes silo frames to trunk workers and results back.

Two ROUTER sockets, one poll loop (the ZeroMQ guide's Majordomo shape):

* frontend -- silos connect with DEALER sockets whose identity is their silo id;
* backend  -- trunk workers connect with DEALER sockets whose identity is their worker id.

The broker reads headers only. Payloads pass through untouched (they are ciphertext once sealing
is on), so the broker never holds a key and never sees an activation. Every received message is
validated structurally; anything malformed is counted in Redis, logged, and dropped, and the
sender gets an ERROR when it can be identified.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import zmq
from redis import RedisError

from broker.generation_routes import GenerationRoutes
from broker.redis_writes import RedisWrites
from broker.rounds import RoundAggregator
from broker.schedules import StepRoutes, replay_membership, schedule_for
from broker.silo_records import SiloRecords
from broker.trunk_rounds import TrunkRounds
from shared.runtime import failpoints
from shared.wire.control_text import PeerIntro, ResumePoint, SiloReport
from shared.runtime.metrics import RoleMetrics
from shared.wire.protocol import BEACON_SUFFIX, GENERATION_KINDS, ErrorReason, Kind, Reason
from shared.crypto.registration import verify_registration
from shared.state.registry import Heartbeat, Registry, retry_redis
from shared.state.run_config import describe, differences, parse_claim, run_config
from shared.runtime.settings import BrokerSettings
from shared.crypto.silo_directory import SiloDirectory
from shared.wire.transport import ServerSecurity
from shared.wire.wire import (
    FrameError,
    Header,
    Message,
    message_from_wire,
    message_to_wire,
    split_frames,
)

log = logging.getLogger("broker")

POLL_MS = 100


@dataclass
class Worker:
    worker_id: str
    identity: bytes


class Broker:
    def __init__(self, settings: BrokerSettings, registry: Registry, silos: list[str], local_steps: int | None) -> None:
        self.settings = settings
        self.registry = registry
        self.run_id = settings.run_id
        self.silos = list(silos)
        self.local_steps = local_steps
        # Every Redis write of the poll loop goes through this background writer (counters coalesce).
        self.writes = RedisWrites(registry, flush_s=min(settings.heartbeat_s, 0.5))
        self.directory = SiloDirectory(registry, settings.operator_fingerprint)  # whose READY is genuine
        self.records = SiloRecords(registry, self.writes, settings.liveness_ttl_s)  # Redis on the silos' behalf
        # What the mode decides (when a FORWARD goes, to which worker): broker/schedules.py.
        self.schedule = schedule_for(settings, self.silos,
                                     lambda silo, w: self.writes.call("assign", registry.assign, silo, w))
        self.routes = StepRoutes()  # which worker holds each silo's open step
        self.left: set[str] = set()
        self.away: set[str] = set()  # silent past round_timeout_s: skipped until they register again
        self.silo_identity: dict[str, bytes] = {}
        self._reset_schedule()
        self._next_tick = 0.0
        self._next_beat = 0.0
        self.started_at = time.monotonic()
        # Recovery: a broker started again for a run in progress resumes every peer from the last
        # committed round (each role holds a checkpoint of it), as does a restart of any peer.
        self.epoch = registry.broker_epoch()
        self.committed_round = registry.committed_round()
        self.incarnation: dict[str, str] = {}  # peer -> the process instance it registered as
        # After a rollback every peer says READY again before its frames count: whatever it sent
        # before (stale steps of the abandoned timeline) arrives earlier on its connection, and is dropped.
        self.rolling_back: set[str] = set()
        if self.epoch > 1:
            log.warning("broker restarted (epoch %d): every peer resumes from round %d", self.epoch, self.committed_round)
        self.silo_seen: dict[str, float] = {}  # last frame from each silo's registered connection
        self.ready_ts: dict[str, int] = {}  # newest accepted registration token per silo
        # The run's reference config (Redis) and this broker's own part of it (mode, encryption):
        # a peer's READY claims its config, and one that differs is refused with the fields named.
        self.own_config = run_config(settings)
        self.run_reference = self._load_run_config()
        self.workers: dict[str, Worker] = {}
        self.worker_seen: dict[str, float] = {}  # last frame from each worker: liveness over ZeroMQ
        self.purged: dict[str, Worker] = {}  # declared dead; readmitted if their heartbeat comes back
        self.generation_routes = GenerationRoutes()
        # Every worker must hold a silo's session: hellos go to all workers, and the latest one per
        # silo is replayed to workers that join later. One ack per (silo, round) goes back.
        self.latest_hello: dict[str, list] = {}
        self.acked: set[tuple[str, int]] = set()
        self.stats = {"routed": 0, "rejected": 0}
        self._stopping = False
        self._held_commit: int | None = None  # fail point "uncommitted-hello" (tests only)

        self.metrics = RoleMetrics("broker", "broker", settings.metrics_port, settings.metrics_addr)
        self.ctx = zmq.Context.instance()
        self.security = ServerSecurity(self.ctx, settings.curve, settings.curve_cert, settings.curve_allow_dir)
        self.frontend = self._bind(settings.frontend_bind)
        self.backend = self._bind(settings.backend_bind)

    def _bind(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise instead of vanishing
        if address == self.settings.backend_bind:
            # A restarted worker reconnects under its old identity: it takes the identity over at once.
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.security.secure(sock)
        sock.bind(address)
        return sock

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        self.registry.join("broker", "broker", mode=self.settings.mode, frontend=self.settings.frontend_bind)
        self.registry.list_run()  # runs created by hand (redis-cli) show up in `splitfed status` too
        heartbeat = Heartbeat(self.registry, "broker", "broker", self.settings.heartbeat_s, self.settings.liveness_ttl_s).start()
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            signal.signal(signal.SIGTERM, self._on_sigterm)
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        log.info("broker up: run=%s mode=%s silos=%s", self.run_id, self.settings.mode, ",".join(self.silos))
        if self.settings.burst and (self._redis("read the round state", self.registry.round_state) or {}).get(
                "state") == "finished":
            log.info("--burst: the run is already finished; nothing to serve")
            self._stopping = True
        try:
            while not self._stopping:
                events = dict(poller.poll(POLL_MS))
                if self.frontend in events:
                    identity, *frames = self.frontend.recv_multipart(copy=False)
                    self.metrics.received(frames)
                    self.process_silo(identity.bytes, frames)
                if self.backend in events:
                    identity, *frames = self.backend.recv_multipart(copy=False)
                    self.metrics.received(frames)
                    self.process_trunk(identity.bytes, frames)
                self._dispatch()
                self._tick()
                self.metrics.queue_depth(self.schedule.waiting)
        finally:
            heartbeat.stop()
            self.writes.close()  # the last commits and counters reach Redis before we say we left
            self.registry.leave("broker", "broker", status="stopped")
            self.frontend.close()
            # A burst stop has just told the workers the run is over: let that leave the socket.
            self.backend.close(linger=2000 if self.settings.burst else 0)
            self.security.stop()
        log.info("broker stopped: routed=%d rejected=%d", self.stats["routed"], self.stats["rejected"])
        return 0

    def _on_sigterm(self, *_: object) -> None:
        self._stopping = True

    def stop(self) -> None:
        """Ask the poll loop to finish (from a signal handler or another thread)."""
        self._stopping = True

    # ------------------------------------------------------------------ silo side
    def process_silo(self, identity: bytes, frames: list) -> None:
        header = self._parse(frames, peer=f"silo {identity!r}", reply_socket=self.frontend, reply_to=identity)
        if header is None:
            return
        silo = header.silo_id
        if silo not in self.silos:
            self._reject("unknown_silo", f"silo {silo!r} is not a member of run {self.run_id}", self.frontend, identity, header)
            return
        if header.kind == Kind.READY:
            known = self.silo_identity.get(silo)
            if self.settings.encryption:
                # Only the holder of the enrolled identity key registers as this silo, so a genuine
                # (e.g. restarted) silo takes its id back at once and nobody else can squat it.
                try:
                    self.ready_ts[silo] = self._verify_ready(frames, silo)
                except FrameError as exc:
                    self._reject(exc.reason, exc.detail, self.frontend, identity, header)
                    return
                known = None
            if refusal := self._config_refusal(header, frames, "silo"):
                self._reject(*refusal, self.frontend, identity, header)
                return
            silent_s = time.monotonic() - self.silo_seen.get(silo, 0.0)
            if known is not None and known != identity and silent_s < self.settings.liveness_ttl_s:
                # A live silo keeps its connection: another peer may not take its place. A restarted
                # silo gets it once the old connection has been silent for liveness_ttl_s.
                self._reject(Reason.IDENTITY_TAKEN, f"{silo} is registered on another connection that is alive",
                             self.frontend, identity, header)
                return
            self.silo_identity[silo] = identity
            self.silo_seen[silo] = time.monotonic()
            self.left.discard(silo)
            self.schedule.silo_registered(silo)
            self._admit(silo, header, "silo", frames)
            self.rolling_back.discard(silo)
            self._send(self.frontend, identity, Message(Kind.READY, self.run_id, silo, text=ResumePoint(self.committed_round).to_text()))
            log.info("silo %s ready (resumes after round %d)", silo, self.committed_round)
            return
        if silo not in self.silo_identity:
            # Not registered with this broker (it restarted, or the silo never said READY).
            self._reject(Reason.REGISTER, f"{silo} is not registered with this broker (say READY)", self.frontend,
                         identity, header)
            return
        if self.silo_identity.get(silo) != identity:
            # A peer may not speak for a silo it did not register as.
            self._reject("identity_mismatch", f"frame for {silo!r} from another connection", self.frontend, identity, header)
            return
        self.silo_seen[silo] = time.monotonic()
        if silo in self.rolling_back and header.kind != Kind.HEARTBEAT:
            self.writes.count_rejected("stale_after_rollback")
            return
        if header.kind == Kind.HELLO:
            self.latest_hello[silo] = frames
            self.acked.discard((silo, header.round))
            for worker in self.workers.values():
                self._forward_to_worker(worker, frames)
        elif header.kind == Kind.FORWARD:
            self._submit_forward(silo, header, frames, identity)
        elif header.kind == Kind.BACKWARD:
            worker = self.routes.holder.get(silo)
            if worker is None or worker not in self.workers:
                self._reject("no_open_step", f"BACKWARD step {header.step} without an open step", self.frontend, identity, header)
                return
            self._forward_to_worker(self.workers[worker], frames)
        elif header.kind == Kind.AGG_JOIN:
            self.rounds.join(silo, header.round, header.seq, self._active_silos())
        elif header.kind == Kind.AGG_UPLOAD:
            try:
                upload = message_from_wire([f.buffer for f in frames], self.settings.max_tensor_bytes).tensors[0]
            except FrameError as exc:
                self._reject(exc.reason, exc.detail, self.frontend, identity, header)
                return
            if why := self.rounds.upload(silo, header.round, header.seq, upload):
                self._reject("aggregation", why, self.frontend, identity, header)
        elif header.kind == Kind.CHECKPOINTED:
            self.rounds.checkpointed(silo, header.round)
        elif header.kind in GENERATION_KINDS:  # split generation: to the worker holding the cache, no turn taken
            worker = self.generation_routes.pick(header, self.workers, self.schedule.home_worker(silo))
            if worker is None and header.kind == Kind.GENERATE:
                self._reject("no_generation", "no trunk worker holds a generation for this silo", self.frontend, identity, header)
                return
            if worker is not None:  # an END for no open generation has nothing to free
                self._forward_to_worker(worker, frames)
        elif header.kind == Kind.DISCONNECT:
            log.info("silo %s finished", silo)
            self.left.add(silo)
            self._unschedule(silo)
            self.rounds.drop(silo, "left the run")
            if self.left >= set(self.silos):
                self._finish_run()
        elif header.kind == Kind.PROGRESS:
            try:
                self.records.report(silo, SiloReport.from_text(_text_of(header, frames)))
            except ValueError as exc:
                self._reject("bad_report", str(exc), self.frontend, identity, header)
        elif header.kind == Kind.HEARTBEAT:
            pass
        else:
            self._reject("unexpected_kind", f"{header.kind.name} from a silo", self.frontend, identity, header)

    def _finish_run(self) -> None:
        """Every silo has left: the run is over. Workers are told (a --burst worker exits), and a
        --burst broker stops once those messages are out."""
        self.writes.call("finish the rounds", self.registry.finish_rounds)
        for worker in self.workers.values():
            self._send(self.backend, worker.identity, Message(Kind.DISCONNECT, self.run_id, worker.worker_id))
        log.info("every silo has finished: the run is over")
        if self.settings.burst:
            self._stopping = True

    def _verify_ready(self, frames: list, silo: str) -> int:
        msg = message_from_wire([f.buffer for f in frames], self.settings.max_tensor_bytes)
        if not msg.tensors:
            raise FrameError("bad_registration", f"READY for {silo} carries no signed registration token")
        return verify_registration(bytes(msg.tensors[0].numpy()), self.run_id, silo,
                                   lambda s: retry_redis(self.directory.lookup, s, attempts=8), self.ready_ts.get(silo))

    # ------------------------------------------------------------------ trunk side
    def process_trunk(self, identity: bytes, frames: list) -> None:
        header = self._parse(frames, peer=f"worker {identity!r}", reply_socket=None, reply_to=None)
        if header is None:
            return
        if header.kind == Kind.READY:
            worker_id = header.silo_id  # a worker's READY names the worker in the id field
            if refusal := self._config_refusal(header, frames, "trunk worker"):
                self._reject(*refusal, self.backend, identity, header)
                return
            self.workers[worker_id] = Worker(worker_id, identity)
            self.worker_seen[worker_id] = time.monotonic()
            self.purged.pop(worker_id, None)
            new_process = self._admit(worker_id, header, "worker", frames)
            self.rolling_back.discard(worker_id)
            self._send(self.backend, identity, Message(Kind.READY, self.run_id, worker_id,
                                                       text=ResumePoint(self.committed_round).to_text()))
            log.info("trunk worker %s ready", worker_id)
            if new_process:  # it holds no sessions yet: give it the silos' current handshakes
                for hello in self.latest_hello.values():
                    self._route(self.backend, identity, hello)
            return
        if identity.endswith(BEACON_SUFFIX.encode()):
            # A worker's liveness beacon (trunk_worker/beacon.py): proof of life for the worker on
            # the twin connection, also while that worker is busy in a step.
            if header.kind != Kind.HEARTBEAT:
                self.writes.count_rejected("unexpected_kind")
            else:
                self._alive(identity[: -len(BEACON_SUFFIX)], readmit=True)
            return
        sender = self._alive(identity, readmit=header.kind == Kind.HEARTBEAT)
        if sender in self.rolling_back and header.kind != Kind.HEARTBEAT:
            self.writes.count_rejected("stale_after_rollback")
            return
        if header.kind == Kind.HEARTBEAT:
            if sender is None:
                self._send(self.backend, identity, Message(Kind.ERROR, self.run_id, header.silo_id,
                                                           text=ErrorReason.of(Reason.REGISTER, "unknown to this broker").to_text()))
            return  # liveness: worker_seen, judged by _tick
        if header.kind == Kind.TRUNK_SYNC:
            for w in self.trunk_rounds.relay_targets(header.round, header.silo_id):  # the sender too
                if w in self.workers:
                    self._forward_to_worker(self.workers[w], frames)
            return
        if header.kind == Kind.ROUND_DONE:
            if self.trunk_rounds.done(header.round, header.silo_id):
                self.rounds.trunk_done(header.round)
            return
        silo = header.silo_id
        target = self.silo_identity.get(silo)
        if target is None:
            log.warning("result for unknown silo %s dropped", silo)
            self.writes.count_rejected("unroutable")
            return
        if header.kind == Kind.HELLO_ACK:
            if (silo, header.round) not in self.acked:
                self.acked.add((silo, header.round))
                self._route(self.frontend, target, frames)
                if self._held_commit is not None and header.round == self._held_commit + 1:
                    failpoints.stop_here("uncommitted-hello")  # the trunk holds a next-round session
            return
        if header.kind in (Kind.FORWARD_RESULT, Kind.BACKWARD_RESULT, Kind.ERROR, Kind.GENERATE_RESULT):
            self._route(self.frontend, target, frames)
            if header.kind in (Kind.BACKWARD_RESULT, Kind.ERROR):
                if self.schedule.result_routed(silo, error=header.kind == Kind.ERROR):
                    self.routes.holder.pop(silo, None)
        else:
            log.warning("unexpected %s from worker dropped", header.kind.name)
            self.writes.count_rejected("unexpected_kind")

    # ------------------------------------------------------------------ dispatch and routing
    def _submit_forward(self, silo: str, header: Header, frames: list, identity: bytes) -> None:
        if refusal := self.schedule.submit(silo, header.step, frames):
            self._reject(refusal.name, refusal.detail, self.frontend, identity, header)

    def _ready_workers(self) -> list[str]:
        return [w for w in self.workers if w not in self.rolling_back]

    def _dispatch(self) -> None:
        if ready := sorted(self._ready_workers()):
            self.schedule.dispatch(ready, self.routes, self._send_step)

    def _send_step(self, worker_id: str, silos: list[str], frames: list) -> None:
        for silo in silos:
            self.routes.holder[silo] = worker_id  # its BACKWARD must reach the graph's holder
        self._forward_to_worker(self.workers[worker_id], frames)

    def _active_silos(self) -> set[str]:
        return set(self.silos) - self.left - self.away

    def _send_to_silo(self, silo: str, msg: Message) -> None:
        identity = self.silo_identity.get(silo)
        if identity is not None:
            self._send(self.frontend, identity, msg)

    # ------------------------------------------------------------------ periodic checks
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

    # ------------------------------------------------------------------ trunk averaging (hierarchical)
    def _start_trunk_sync(self, rnd: int, weights: dict[str, int]) -> bool:
        """ROUND_END to every worker: checkpoint the round, after averaging the trunk adapters of the
        participating silos (hierarchical, unless --personalize). True when there are ROUND_DONEs to wait for."""
        workers = sorted(self._ready_workers())
        if not workers:
            return False
        averaging = self.schedule.averaging_workers(weights, workers)
        self._send_round_ends(rnd, self.trunk_rounds.start(rnd, workers, averaging, weights))
        return True

    def _send_round_ends(self, rnd: int, round_ends: list[tuple[str, str | None]]) -> None:
        for w, text in round_ends:
            if w in self.workers:
                self._send(self.backend, self.workers[w].identity, Message(Kind.ROUND_END, self.run_id, w, rnd, text=text))

    def _forward_to_worker(self, worker: Worker, frames: list) -> None:
        self._route(self.backend, worker.identity, frames)

    def _route(self, sock: zmq.Socket, identity: bytes, frames: list) -> None:
        try:
            # NOBLOCK: a peer that stops reading must never stall the broker for everyone else.
            sock.send_multipart([identity, *frames], copy=False, flags=zmq.NOBLOCK)
            self.stats["routed"] += 1
            self.metrics.sent(frames)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or its queue is full (EAGAIN)
            log.warning("could not route to %r: %s", identity, exc)
            self.writes.count_rejected("unroutable")

    def _send(self, sock: zmq.Socket, identity: bytes, msg: Message) -> None:
        self._route(sock, identity, message_to_wire(msg))

    # ------------------------------------------------------------------ rounds and recovery
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
        if rnd == 0 and failpoints.armed("uncommitted-hello"):
            # Test hook: leave round 0 uncommitted until a silo's round-1 session is acknowledged,
            # then stop there (the recovery test kills the broker in exactly this window).
            self._held_commit = rnd
            return
        self.committed_round = rnd
        self.writes.call(f"commit round {rnd}", self.registry.commit_round, rnd)
        log.info("round %d committed", rnd)

    def _admit(self, peer: str, header: Header, role: str, frames: list | None = None) -> bool:
        """A (re)registration. A known peer in a new process means it crashed and lost its state
        since the last committed round: the whole run goes back there, so nothing is lost or doubled."""
        incarnation = self._incarnation_of(header, frames)
        known = self.incarnation.get(peer)
        self.incarnation[peer] = incarnation
        if role == "silo" and peer in self.away:
            # The run went on without it: it rejoins at the next round, nobody rolls back.
            self.away.discard(peer)
            log.warning("silo %s is back: it rejoins after round %d", peer, self.committed_round)
            self._reset_schedule_for_return(peer)
        elif known is not None and known != incarnation:
            self._rollback(f"{role} {peer} restarted", exclude=peer)
        return known != incarnation  # a new process (first start or restart), not a re-registration

    def _incarnation_of(self, header: Header, frames: list | None) -> str:
        return PeerIntro.from_text(_text_of(header, frames)).incarnation

    def _config_refusal(self, header: Header, frames: list, role: str) -> tuple[str, str] | None:
        """(reason, detail) when a READY's config claim (shared/state/run_config.py) differs from the run's."""
        try:
            claim = parse_claim(_text_of(header, frames))
        except ValueError as exc:
            return "bad_config", str(exc)
        if claim is None:
            return None  # a peer that claims none still checked the run's config itself at start
        _, theirs = claim
        if not set(theirs) <= set(self.run_reference) | set(self.own_config):
            self.run_reference = self._load_run_config() or self.run_reference  # recorded since we started
        if diffs := differences({**self.run_reference, **self.own_config}, theirs):
            return "config_mismatch", describe(diffs, "run", f"this {role}")
        if missing := {k: v for k, v in theirs.items() if k not in self.run_reference}:
            # the first peer to claim a field sets it for the run (silos cannot write to Redis themselves)
            self.run_reference = {**missing, **self.run_reference}
            self.writes.call("record the run config", self.registry.claim_run_config, missing)
        return None

    def _load_run_config(self) -> dict:
        try:
            return self._redis("read the run config", self.registry.run_config) or {}
        except ValueError as exc:  # hand-edited metadata: every role's own start-up check says so too
            log.warning("%s", exc)
            return {}

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

    def _redis(self, what: str, fn, *args):
        """A Redis call off the hot path that must not take the broker down while Redis restarts."""
        try:
            return fn(*args)
        except RedisError as exc:
            log.warning("Redis unavailable (%s): %s", what, exc)
            return None

    # ------------------------------------------------------------------ validation
    def _parse(self, frames: list, peer: str, reply_socket: zmq.Socket | None, reply_to: bytes | None) -> Header | None:
        try:
            header, *_ = split_frames([f.buffer for f in frames], self.settings.max_tensor_bytes)
        except FrameError as exc:
            self.stats["rejected"] += 1
            self.writes.count_rejected(exc.reason)
            self.metrics.rejected(exc.reason)
            log.warning("rejected frame from %s: %s", peer, exc)
            return None
        if header.run_id != self.run_id:
            self._reject("wrong_run", f"run {header.run_id!r}, this broker serves {self.run_id!r}", reply_socket, reply_to, header)
            return None
        return header

    def _reject(self, reason: Reason | str, detail: str, sock: zmq.Socket | None, identity: bytes | None,
                header: Header) -> None:
        reason = ErrorReason.of(reason).name  # the code's value: counters and metrics are keyed by it
        self.stats["rejected"] += 1
        self.writes.count_rejected(reason)
        self.metrics.rejected(reason)
        log.warning("rejected %s from %s: %s", header.kind.name, header.silo_id, detail,
                    extra={"silo": header.silo_id, "round": header.round, "step": header.step, "reason": reason})
        if sock is not None and identity is not None:
            msg = Message(Kind.ERROR, self.run_id, header.silo_id, header.round, header.step,
                          text=ErrorReason.of(reason, detail).to_text())
            self._send(sock, identity, msg)


def _text_of(header: Header, frames: list | None) -> str:
    """The text frame of a message already validated by split_frames ("" when it has none)."""
    if not header.has_text or not frames:
        return ""
    return bytes(frames[-1].buffer).decode("utf-8", "replace")
