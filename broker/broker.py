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

import zmq

from broker.admission import BrokerAdmission, _text_of
from broker.generation_routes import GenerationRoutes
from broker.liveness import PeerLiveness
from broker.peers import Worker
from broker.recovery import BrokerRecovery
from broker.redis_writes import RedisWrites
from broker.routing import BrokerRouting
from broker.schedules import StepRoutes, schedule_for
from broker.silo_records import SiloRecords
from shared.crypto.silo_directory import SiloDirectory
from shared.runtime import failpoints
from shared.runtime.metrics import RoleMetrics
from shared.runtime.settings import BrokerSettings
from shared.state.registry import Heartbeat, Registry
from shared.state.run_config import run_config
from shared.wire.control_text import AggAttempt, AggJoin, SiloReport
from shared.wire.protocol import BEACON_SUFFIX, GENERATION_KINDS, ErrorReason, Kind, Reason
from shared.wire.transport import ServerSecurity
from shared.wire.wire import FrameError, Header, Message, message_from_wire

log = logging.getLogger("broker")

POLL_MS = 100


class Broker(BrokerAdmission, PeerLiveness, BrokerRecovery, BrokerRouting):
    """The poll loop and what each message does; READY in broker/admission.py, periodic checks in
    broker/liveness.py, commits and rollbacks in broker/recovery.py, sends and refusals in
    broker/routing.py, the mode's scheduling in broker/schedules.py."""

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
            self._silo_ready(silo, identity, header, frames)
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
            try:
                weight = AggJoin.from_text(_text_of(header, frames)).weight
            except ValueError as exc:
                self._reject("aggregation", str(exc), self.frontend, identity, header)
                return
            self.rounds.join(silo, header.round, weight, self._active_silos())
        elif header.kind == Kind.AGG_UPLOAD:
            try:
                msg = message_from_wire([f.buffer for f in frames], self.settings.max_tensor_bytes)
                attempt = AggAttempt.from_text(msg.text).attempt
            except FrameError as exc:
                self._reject(exc.reason, exc.detail, self.frontend, identity, header)
                return
            except ValueError as exc:
                self._reject("aggregation", str(exc), self.frontend, identity, header)
                return
            if why := self.rounds.upload(silo, header.round, attempt, msg.tensors[0]):
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

    # ------------------------------------------------------------------ trunk side
    def process_trunk(self, identity: bytes, frames: list) -> None:
        header = self._parse(frames, peer=f"worker {identity!r}", reply_socket=None, reply_to=None)
        if header is None:
            return
        if header.kind == Kind.READY:
            self._worker_ready(identity, header, frames)
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
        if refusal := self.schedule.submit(silo, header.step, frames, last=not header.more):
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

    # ------------------------------------------------------------------ validation
