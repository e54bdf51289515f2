"""The trunk worker: runs the middle blocks forward and backward for the silos' steps.

The worker owns the connection to the broker, the silos' sessions, registration and recovery; what
a step does in the run's mode is its step runner's (trunk_worker/serial_steps.py and the runners
beside it). The worker never sees token ids, labels or the loss: only hidden states and their gradients.
"""

from __future__ import annotations

import logging
import resource
import secrets
import signal
import threading
import time

import zmq

from shared.crypto import enrollment
from shared.crypto import keys as keystore
from shared.crypto.handshake import HelloGuard
from shared.crypto.sealed_codec import SealedCodec
from shared.crypto.silo_directory import SiloDirectory
from shared.model.adapters import apply_adapter
from shared.runtime import failpoints
from shared.runtime.metrics import RoleMetrics
from shared.runtime.settings import TrunkSettings
from shared.runtime.step_timeline import StepTimeline
from shared.state import checkpoint
from shared.state.registry import Heartbeat, Registry, retry_redis
from shared.state.run_config import ConfigMismatch, run_config
from shared.wire.broker_liveness import BrokerLiveness
from shared.wire.codec import PlainCodec
from shared.wire.control_text import ResumePoint
from shared.wire.peer_link import BrokerLink
from shared.wire.protocol import WIRE_DTYPE_BY_NAME, ErrorReason, Kind, Reason
from shared.wire.wire import FrameError, Message, bundle_from_wire, header_from_wire, split_frames
from trunk_worker.base_model import load_trunk_base
from trunk_worker.beacon import Beacon
from trunk_worker.client_batch_steps import ClientBatchSteps
from trunk_worker.generation import TrunkGenerations
from trunk_worker.hierarchical_steps import HierarchicalSteps
from trunk_worker.recovery import TrunkRecovery
from trunk_worker.serial_steps import RunnerContext, SerialSteps, TrunkModel
from trunk_worker.sessions import TrunkSessions
from trunk_worker.step_error import StepError

log = logging.getLogger("trunk")

POLL_MS = 100


class TrunkWorker(TrunkSessions, TrunkRecovery):
    """One trunk worker: its loop and message handling here; the silos' sessions in
    trunk_worker/sessions.py, checkpoints and restore in trunk_worker/recovery.py, the connection
    in shared/wire/peer_link.py, what a step does in the mode's runner."""

    def __init__(self, settings: TrunkSettings, registry: Registry, model_dir) -> None:
        self.settings = settings
        self.registry = registry
        trunk, device = load_trunk_base(model_dir, settings)  # device: where its inputs go
        trainable = apply_adapter(trunk, settings.adapter_config(), settings.seed)
        self.model = TrunkModel(trunk, trainable, device, compute_dtype=WIRE_DTYPE_BY_NAME[settings.dtype],
                                wire_dtype=WIRE_DTYPE_BY_NAME[settings.wire_dtype])
        self.generations = TrunkGenerations(trunk, device, self.model.wire_dtype, compute_dtype=self.model.compute_dtype)
        self.accepted_hellos: dict[str, bytes] = {}
        self.incarnation = secrets.token_hex(4)  # tells the broker this process is new (a restart)
        self.run_config = run_config(settings)  # what READY claims and silos' HELLOs must agree with
        self._stopping = False
        self._sigterms = 0
        self.metrics = RoleMetrics("trunk", settings.worker_id, settings.metrics_port, settings.metrics_addr)
        self.keys = None
        self.directory = SiloDirectory(registry, settings.operator_fingerprint)  # the silos a hello may come from
        self.codec = self._make_codec(settings, registry)
        self.timeline = StepTimeline(self.codec, self.metrics)  # per-step parts, for `bench step`
        # What a step is in this run's mode: the worker hands every step message to it.
        self.steps = _runner_for(self.model, RunnerContext(settings, self._send, self._close_round, self.timeline,
                                                           self.metrics), self.keys)
        self._handlers = self._message_handlers()
        self.ctx = zmq.Context.instance()
        # A worker never gives up on a silent broker (timeout None): it serves whoever comes back.
        liveness = BrokerLiveness(settings.heartbeat_s, None, settings.broker_backend)
        self.link = BrokerLink(settings.worker_id, settings.run_id, settings.broker_backend, self.codec, self.metrics,
                               self.timeline, liveness, settings.curve, settings.curve_cert, settings.curve_broker_key)

    def _make_codec(self, settings: TrunkSettings, registry: Registry):
        if not settings.encryption:
            log.warning("encryption is OFF: activations and gradients cross the network in the clear")
            return PlainCodec(settings.max_tensor_bytes, settings.wire_dtype, settings.wire_chunk_bytes)
        if settings.keys_dir is None:
            raise ValueError("encryption is on: pass --keys-dir with the trunk service key "
                             "(make one with `splitfed keys gen --role trunk --out DIR`)")
        self.keys = keystore.load_trunk_keys(settings.keys_dir)
        enrollment.publish_trunk_key(registry, self.keys.x25519_public)
        # Workers of one service share its key: each seals under its own nonce slot.
        self.sender_slot = enrollment.claim_sender_slot(registry)
        self.hello_guard = HelloGuard()
        log.info("trunk service key %s", keystore.display_fingerprint(self.keys.fingerprint))
        return SealedCodec(settings.max_tensor_bytes, settings.wire_dtype, settings.wire_chunk_bytes)

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        s = self.settings
        self.registry.join("trunk", s.worker_id, device=str(self.model.device), adapter=s.adapter)
        heartbeat = Heartbeat(self.registry, "trunk", s.worker_id, s.heartbeat_s, s.liveness_ttl_s,
                              status_fn=lambda: {"updates": self.updates, "pending": len(self.pending)}).start()
        beacon = self._start_beacon()  # liveness for the broker, also while a step computes
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            signal.signal(signal.SIGTERM, self._on_sigterm)
        if s.checkpoint_dir is not None and not checkpoint.rounds_on_disk(self._checkpoints):
            self._save_checkpoint(-1)  # the state before any update: where a rollback of round 0 returns
        self._register()
        if s.burst and retry_redis(self.registry.round_state).get("state") == "finished":
            log.info("--burst: the run is already finished; nothing to serve")
            self._stopping = True
        next_beat = time.monotonic() + s.heartbeat_s
        log.info("trunk worker %s up on %s (%d trainable tensors)", s.worker_id, self.model.device,
                 self.steps.trainable_tensors)
        try:
            while not self._stopping:
                if time.monotonic() >= next_beat:  # the broker learns we are alive, and we learn
                    self.link.heartbeat()  # if it forgot us
                    next_beat = time.monotonic() + s.heartbeat_s
                if self.link.wait(POLL_MS, socket_time=False):
                    with self.timeline.busy():
                        self.handle(self.link.receive())
                    self.metrics.queue_depth(len(self.pending))
                self.steps.poll()
        finally:
            heartbeat.stop()
            beacon.stop()
            if s.save_dir is not None:
                self._save_adapters(s.save_dir)
            crypto_s = self.codec.crypto_seconds() if isinstance(self.codec, SealedCodec) else 0.0
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            self.registry.update("trunk", s.worker_id, updates=self.updates, recomputed_steps=self.steps.recomputed_steps,
                                 crypto_s=f"{crypto_s:.6f}",
                                 peak_rss_mb=f"{peak_mb:.1f}", timeline=self.timeline.to_json())
            self.registry.leave("trunk", s.worker_id, status="stopped")
            self.link.close()
        log.info("trunk worker stopped after %d updates", self.updates)
        return 0

    def _start_beacon(self) -> Beacon:
        return Beacon(self.ctx, self.settings).start()

    @property
    def updates(self) -> int:
        return self.steps.updates

    @property
    def pending(self):
        return self.steps.pending

    def handle(self, frames: list) -> None:
        try:
            header = header_from_wire(frames[0], self.settings.max_tensor_bytes)
            if header.kind == Kind.BUNDLE:
                return self.bundle(frames)
            # the header is parsed here, once: split_frames, the codec and the session reuse it
            msg = self.codec.decode(frames, split_frames(frames, self.settings.max_tensor_bytes, header))
            if msg.run_id != self.settings.run_id:
                raise StepError("wrong_run", f"frame for run {msg.run_id}")
            handler = self._handlers.get(msg.kind)
            if handler is None:
                raise StepError("unexpected_kind", msg.kind.name)
            handler(msg)
        except (FrameError, StepError) as exc:  # StepError includes the generations' GenerationError
            self._reject(frames, exc)

    def _message_handlers(self) -> dict:
        """What each kind of message does: step messages go to the mode's runner."""
        return {
            Kind.FORWARD: self.steps.forward,
            Kind.BACKWARD: self.steps.backward,
            Kind.ROUND_END: self.steps.round_end,
            Kind.TRUNK_SYNC: self.steps.trunk_sync,
            Kind.HELLO: self._on_hello,
            Kind.READY: self._on_ready,
            Kind.ROLLBACK: self._on_rollback,
            Kind.ERROR: self._on_broker_error,
            Kind.HEARTBEAT: lambda msg: None,
            Kind.DISCONNECT: self._on_run_finished,
            Kind.GENERATE: self._on_generation,
            Kind.GENERATE_END: self._on_generation,
        }

    def _reject(self, frames: list, exc: FrameError | StepError) -> None:
        self.registry.count_rejected(exc.reason)
        self.metrics.rejected(exc.reason)
        log.warning("rejected: %s", exc, extra={"reason": exc.reason})
        self._refuse(frames, ErrorReason(exc.reason, getattr(exc, "detail", "")))

    def _on_hello(self, msg: Message) -> None:
        if (ack := self.hello(msg)) is not None:
            self._send(ack)

    def _on_ready(self, msg: Message) -> None:
        self.restore(_resume_round(msg.text))  # the broker's ack: where the run stands

    def _on_rollback(self, msg: Message) -> None:
        self.restore(_resume_round(msg.text))
        self._register()  # the broker counts our frames again once this READY arrives

    def _on_broker_error(self, msg: Message) -> None:
        code = ErrorReason.from_text(msg.text).code
        if code == Reason.CONFIG_MISMATCH:
            raise ConfigMismatch(f"the broker refused this trunk worker: {msg.text}")
        if code == Reason.REGISTER:
            log.warning("the broker does not know us (%s): registering again", msg.text)
            self._register()
        else:
            raise StepError("unexpected_kind", f"ERROR from the broker: {msg.text}")

    def _on_run_finished(self, msg: Message) -> None:  # the broker: every silo has finished
        if self.settings.burst:
            log.info("the run is finished: exiting (--burst)")
            self._stopping = True
        else:
            log.info("the run is finished; serving on until SIGTERM (--burst exits here)")

    def _on_generation(self, msg: Message) -> None:  # split generation (trunk_worker/generation.py)
        self.steps.before_generation(msg)
        if (reply := self.generations.handle(msg)) is not None:
            self._send(reply)

    def _refuse(self, frames: list, reason: ErrorReason) -> None:
        """Tell the silo named in the header why (in the clear: an ERROR carries no data)."""
        try:
            h = header_from_wire(frames[0], self.settings.max_tensor_bytes)
        except (FrameError, IndexError):
            return  # nobody to answer
        if h.kind != Kind.ERROR and h.run_id == self.settings.run_id:
            self._send(Message(Kind.ERROR, h.run_id, h.silo_id, h.round, h.step, text=reason.to_text()))

    # ------------------------------------------------------------------ client-batch
    def bundle(self, frames: list) -> None:
        """Open each member (a bad one is refused alone), then the runner runs them as one trunk batch."""
        _, member_frames = bundle_from_wire(frames, self.settings.max_tensor_bytes)
        members = []
        for mf in member_frames:
            try:
                msg = self.codec.decode(mf)
                if msg.kind != Kind.FORWARD or msg.run_id != self.settings.run_id:
                    raise StepError("schema", f"bundle member {msg.kind.name} of run {msg.run_id}")
                if msg.tensors[0].shape[-1] != self.model.hidden_size:
                    raise StepError("schema", f"hidden size {msg.tensors[0].shape[-1]}, trunk expects {self.model.hidden_size}")
                members.append(msg)
            except (FrameError, StepError) as exc:
                self._reject(mf, exc)  # the others of the batch still run
        if members:
            self.steps.bundle(members)

    def _close_round(self, rnd: int) -> None:
        if rnd == 0 and failpoints.armed("round-end-unsaved"):
            failpoints.stop_here("round-end-unsaved")  # test hook: die with the round applied, not saved
        if self.settings.checkpoint_dir is not None:
            self._save_checkpoint(rnd)
        self._send(Message(Kind.ROUND_DONE, self.settings.run_id, self.settings.worker_id, rnd))

    # ------------------------------------------------------------------ registration and recovery
    def _register(self) -> None:
        self.link.register(self.incarnation, self.run_config)

    def _on_sigterm(self, *_: object) -> None:
        """First SIGTERM: stop after the message in hand. Second: stop now. (Counted apart from
        _stopping: a --burst worker already stopping at the run's end is not on its second SIGTERM.)"""
        self._sigterms += 1
        if self._sigterms > 1:
            raise SystemExit(143)
        self._stopping = True

    def _send(self, msg: Message) -> None:
        self.link.send(msg)

    @property
    def sock(self):
        return self.link.sock


def _resume_round(text: str | None) -> int:
    try:
        return ResumePoint.from_text(text).round
    except ValueError as exc:
        raise StepError("schema", str(exc)) from None


def _runner_for(model: TrunkModel, ctx: RunnerContext, trunk_keys) -> SerialSteps:
    """The step runner of the run's mode (trunk_keys: hierarchical workers seal their averaging with them)."""
    mode = ctx.settings.mode
    if mode == "hierarchical":
        return HierarchicalSteps(model, ctx, trunk_keys)
    if mode == "client-batch":
        return ClientBatchSteps(model, ctx)
    if mode == "serial":
        return SerialSteps(model, ctx)
    raise ValueError(f"unknown mode {mode!r}")
