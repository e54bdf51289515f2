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

from broker.serial import SerialScheduler
from shared import keys as keystore
from shared.metrics import RoleMetrics
from shared.protocol import Kind
from shared.registration import verify_registration
from shared.registry import Heartbeat, Registry
from shared.settings import BrokerSettings
from shared.transport import ServerSecurity
from shared.wire import FrameError, Header, Message, message_from_wire, message_to_wire, split_frames

log = logging.getLogger("broker")

POLL_MS = 100


@dataclass
class Worker:
    worker_id: str
    identity: bytes


class Broker:
    def __init__(self, settings: BrokerSettings, registry: Registry, silos: list[str], local_steps: int | None) -> None:
        if settings.mode != "serial":
            raise NotImplementedError(f"mode {settings.mode!r} is not implemented yet; use --mode serial")
        self.settings = settings
        self.registry = registry
        self.run_id = settings.run_id
        self.silos = list(silos)
        self.local_steps = local_steps
        self.scheduler = SerialScheduler(self.silos)
        self.silo_identity: dict[str, bytes] = {}
        self.silo_seen: dict[str, float] = {}  # last frame from each silo's registered connection
        self.ready_ts: dict[str, int] = {}  # newest accepted registration token per silo
        self.workers: dict[str, Worker] = {}
        self._next_worker = 0
        self.step_worker: dict[str, str] = {}  # silo -> worker holding its open step's graph
        # Every worker must hold a silo's session: hellos go to all workers, and the latest one per
        # silo is replayed to workers that join later. One ack per (silo, round) goes back.
        self.latest_hello: dict[str, list] = {}
        self.acked: set[tuple[str, int]] = set()
        self.completed: dict[str, int] = {s: 0 for s in self.silos}
        self.left: set[str] = set()
        self.committed_round = -1
        self.stats = {"routed": 0, "rejected": 0}
        self._stopping = False

        self.metrics = RoleMetrics("broker", "broker", settings.metrics_port, settings.metrics_addr)
        self.ctx = zmq.Context.instance()
        self.security = ServerSecurity(self.ctx, settings.curve, settings.curve_cert, settings.curve_allow_dir)
        self.frontend = self._bind(settings.frontend_bind)
        self.backend = self._bind(settings.backend_bind)

    def _bind(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise instead of vanishing
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
                self.metrics.queue_depth(self.scheduler.waiting)
        finally:
            heartbeat.stop()
            self.registry.leave("broker", "broker", status="stopped")
            self.frontend.close()
            self.backend.close()
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
        if silo not in self.completed:
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
            silent_s = time.monotonic() - self.silo_seen.get(silo, 0.0)
            if known is not None and known != identity and silent_s < self.settings.liveness_ttl_s:
                # A live silo keeps its connection: another peer may not take its place. A restarted
                # silo gets it once the old connection has been silent for liveness_ttl_s.
                self._reject("identity_taken", f"{silo} is registered on another connection that is alive",
                             self.frontend, identity, header)
                return
            self.silo_identity[silo] = identity
            self.silo_seen[silo] = time.monotonic()
            self.left.discard(silo)
            self._send(self.frontend, identity, Message(Kind.READY, self.run_id, silo))
            log.info("silo %s ready", silo)
            return
        if self.silo_identity.get(silo) != identity:
            # A peer may not speak for a silo it did not register as.
            self._reject("identity_mismatch", f"frame for {silo!r} from another connection", self.frontend, identity, header)
            return
        self.silo_seen[silo] = time.monotonic()
        if header.kind == Kind.HELLO:
            self.latest_hello[silo] = frames
            self.acked.discard((silo, header.round))
            for worker in self.workers.values():
                self._forward_to_worker(worker, frames)
        elif header.kind == Kind.FORWARD:
            if not self.scheduler.submit(silo, frames):
                self._reject("queue_full", f"too many FORWARDs waiting for {silo}'s turn", self.frontend, identity, header)
        elif header.kind == Kind.BACKWARD:
            worker = self.step_worker.get(silo)
            if worker is None or worker not in self.workers:
                self._reject("no_open_step", f"BACKWARD step {header.step} without an open step", self.frontend, identity, header)
                return
            self._forward_to_worker(self.workers[worker], frames)
        elif header.kind == Kind.DISCONNECT:
            log.info("silo %s finished", silo)
            self.left.add(silo)
            self.scheduler.silo_done(silo)
            self._maybe_commit_rounds()
            if self.left >= set(self.silos):
                self.registry.finish_rounds()
        elif header.kind == Kind.HEARTBEAT:
            pass
        else:
            self._reject("unexpected_kind", f"{header.kind.name} from a silo", self.frontend, identity, header)

    def _verify_ready(self, frames: list, silo: str) -> int:
        msg = message_from_wire([f.buffer for f in frames], self.settings.max_tensor_bytes)
        if not msg.tensors:
            raise FrameError("bad_registration", f"READY for {silo} carries no signed registration token")
        return verify_registration(bytes(msg.tensors[0].numpy()), self.run_id, silo,
                                   lambda s: keystore.lookup(self.registry, s), self.ready_ts.get(silo))

    # ------------------------------------------------------------------ trunk side
    def process_trunk(self, identity: bytes, frames: list) -> None:
        header = self._parse(frames, peer=f"worker {identity!r}", reply_socket=None, reply_to=None)
        if header is None:
            return
        if header.kind == Kind.READY:
            worker_id = header.silo_id  # a worker's READY names the worker in the id field
            self.workers[worker_id] = Worker(worker_id, identity)
            self._send(self.backend, identity, Message(Kind.READY, self.run_id, worker_id))
            log.info("trunk worker %s ready", worker_id)
            for hello in self.latest_hello.values():
                self._route(self.backend, identity, hello)
            return
        if header.kind == Kind.HEARTBEAT:
            return  # worker liveness is in Redis (TTL keys); dead-worker handling is the reliability issue
        silo = header.silo_id
        target = self.silo_identity.get(silo)
        if target is None:
            log.warning("result for unknown silo %s dropped", silo)
            self.registry.count_rejected("unroutable")
            return
        if header.kind == Kind.HELLO_ACK:
            if (silo, header.round) not in self.acked:
                self.acked.add((silo, header.round))
                self._route(self.frontend, target, frames)
            return
        if header.kind in (Kind.FORWARD_RESULT, Kind.BACKWARD_RESULT, Kind.ERROR):
            self._route(self.frontend, target, frames)
            if header.kind in (Kind.BACKWARD_RESULT, Kind.ERROR):
                self.step_worker.pop(silo, None)
                self.scheduler.step_finished(silo)
            if header.kind == Kind.BACKWARD_RESULT:
                self.completed[silo] = header.step + 1
                self._maybe_commit_rounds()
        else:
            log.warning("unexpected %s from worker dropped", header.kind.name)
            self.registry.count_rejected("unexpected_kind")

    # ------------------------------------------------------------------ dispatch and routing
    def _dispatch(self) -> None:
        if not self.workers:
            return
        ready = self.scheduler.next_dispatch()
        if ready is None:
            return
        silo, frames = ready
        workers = sorted(self.workers)
        worker = self.workers[workers[self._next_worker % len(workers)]]
        self._next_worker += 1
        self.step_worker[silo] = worker.worker_id
        self._forward_to_worker(worker, frames)

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
            self.registry.count_rejected("unroutable")

    def _send(self, sock: zmq.Socket, identity: bytes, msg: Message) -> None:
        self._route(sock, identity, message_to_wire(msg))

    # ------------------------------------------------------------------ rounds
    def _maybe_commit_rounds(self) -> None:
        """Commit round r once every silo has finished its K steps of r (or left)."""
        if not self.local_steps:
            return
        k = self.local_steps
        while True:
            start = (self.committed_round + 1) * k  # first step of the next uncommitted round
            complete = all(self.completed[s] >= start + k or s in self.left for s in self.silos)
            progressed = any(self.completed[s] > start for s in self.silos)  # a last, partial round counts
            if not (complete and progressed):
                return
            self.committed_round += 1
            self.registry.commit_round(self.committed_round)
            log.info("round %d committed", self.committed_round)

    # ------------------------------------------------------------------ validation
    def _parse(self, frames: list, peer: str, reply_socket: zmq.Socket | None, reply_to: bytes | None) -> Header | None:
        try:
            header, *_ = split_frames([f.buffer for f in frames], self.settings.max_tensor_bytes)
        except FrameError as exc:
            self.stats["rejected"] += 1
            self.registry.count_rejected(exc.reason)
            self.metrics.rejected(exc.reason)
            log.warning("rejected frame from %s: %s", peer, exc)
            return None
        if header.run_id != self.run_id:
            self._reject("wrong_run", f"run {header.run_id!r}, this broker serves {self.run_id!r}", reply_socket, reply_to, header)
            return None
        return header

    def _reject(self, reason: str, detail: str, sock: zmq.Socket | None, identity: bytes | None, header: Header) -> None:
        self.stats["rejected"] += 1
        self.registry.count_rejected(reason)
        self.metrics.rejected(reason)
        log.warning("rejected %s from %s: %s", header.kind.name, header.silo_id, detail,
                    extra={"silo": header.silo_id, "round": header.round, "step": header.step, "reason": reason})
        if sock is not None and identity is not None:
            msg = Message(Kind.ERROR, self.run_id, header.silo_id, header.round, header.step, text=f"{reason}: {detail}")
            self._send(sock, identity, msg)
