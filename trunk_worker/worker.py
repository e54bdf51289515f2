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
from pathlib import Path

import torch
import zmq

from shared.state import checkpoint
from shared.crypto import enrollment
from shared.crypto import keys as keystore
from shared.model.adapter_files import adapter_metadata
from shared.model.adapters import apply_adapter
from shared.wire.codec import PlainCodec
from shared.wire.control_text import PeerIntro, ResumePoint
from shared.crypto.handshake import HelloGuard, accept_hello
from shared.runtime.metrics import RoleMetrics
from shared.wire.protocol import BROKER_LIVENESS, WIRE_DTYPE_BY_NAME, ErrorReason, Kind, Reason
from shared.state.registry import Heartbeat, Registry, retry_redis
from shared.state.run_config import ConfigMismatch, claim_line, config_digest, describe, differences, parse_claim, run_config
from shared.crypto.sealed_codec import SealedCodec
from shared.crypto.sealing import SealError
from shared.crypto.silo_directory import SiloDirectory
from shared.runtime.settings import TrunkSettings
from shared.runtime.step_timeline import StepTimeline
from shared.wire.transport import client_socket
from shared.wire.wire import FrameError, Message, bundle_from_wire, header_from_wire, split_frames
from trunk_worker.base_model import load_trunk_base
from trunk_worker.beacon import Beacon
from trunk_worker.client_batch_steps import ClientBatchSteps
from trunk_worker.generation import TrunkGenerations
from trunk_worker.hierarchical_steps import HierarchicalSteps
from trunk_worker.serial_steps import RunnerContext, SerialSteps, TrunkModel
from trunk_worker.step_error import StepError

log = logging.getLogger("trunk")

POLL_MS = 100


class TrunkWorker:
    def __init__(self, settings: TrunkSettings, registry: Registry, model_dir) -> None:
        self.settings = settings
        self.registry = registry
        trunk, device = load_trunk_base(model_dir, settings)  # device: where its inputs go
        trainable = apply_adapter(trunk, settings.adapter_config(), settings.seed)
        self.model = TrunkModel(trunk, trainable, device, compute_dtype=WIRE_DTYPE_BY_NAME[settings.dtype],
                                wire_dtype=WIRE_DTYPE_BY_NAME[settings.wire_dtype])
        self.generations = TrunkGenerations(trunk, device, self.model.wire_dtype, compute_dtype=self.model.compute_dtype)
        self.accepted_hellos: dict[str, bytes] = {}
        self.heard_at = time.monotonic()  # the broker heartbeats us every heartbeat_s
        self.broker_down = False
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
        self.sock = client_socket(self.ctx, settings.worker_id, settings.broker_backend, settings.curve, settings.curve_cert,
                                  settings.curve_broker_key)

    def _make_codec(self, settings: TrunkSettings, registry: Registry):
        if not settings.encryption:
            log.warning("encryption is OFF: activations and gradients cross the network in the clear")
            return PlainCodec(settings.max_tensor_bytes)
        if settings.keys_dir is None:
            raise ValueError("encryption is on: pass --keys-dir with the trunk service key "
                             "(make one with `splitfed keys gen --role trunk --out DIR`)")
        self.keys = keystore.load_trunk_keys(settings.keys_dir)
        enrollment.publish_trunk_key(registry, self.keys.x25519_public)
        # Workers of one service share its key: each seals under its own nonce slot.
        self.sender_slot = enrollment.claim_sender_slot(registry)
        self.hello_guard = HelloGuard()
        log.info("trunk service key %s", keystore.display_fingerprint(self.keys.fingerprint))
        return SealedCodec(settings.max_tensor_bytes)

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
                    self._send(Message(Kind.HEARTBEAT, s.run_id, s.worker_id))  # if it forgot us
                    next_beat = time.monotonic() + s.heartbeat_s
                if not self.sock.poll(POLL_MS):
                    self._broker_silence()
                else:
                    self._broker_heard()
                    with self.timeline.busy():
                        with self.timeline.io():
                            frames = self.sock.recv_multipart(copy=False)
                        self.metrics.received(frames)
                        self.handle([f.buffer for f in frames])
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
            self.sock.close()
        log.info("trunk worker stopped after %d updates", self.updates)
        return 0

    def _start_beacon(self) -> Beacon:
        return Beacon(self.ctx, self.settings).start()

    def _broker_silence(self) -> None:
        """Say once that the broker looks down. ZeroMQ reconnects by itself with back-off, and a
        restarted broker answers our next heartbeat with "register"."""
        silent_s = time.monotonic() - self.heard_at
        if not self.broker_down and silent_s >= BROKER_LIVENESS * self.settings.heartbeat_s:
            self.broker_down = True
            log.warning("the broker has been silent for %.1fs (%d heartbeats): it looks down; waiting for it",
                        silent_s, BROKER_LIVENESS, extra={"reason": "broker_silent"})

    def _broker_heard(self) -> None:
        if self.broker_down:
            log.warning("the broker answers again after %.1fs", time.monotonic() - self.heard_at)
        self.heard_at, self.broker_down = time.monotonic(), False

    def _save_adapters(self, directory: Path) -> None:
        """The trunk's adapter(s) for `splitfed eval` / `splitfed export` (the runner knows which)."""
        self.steps.save_adapters(directory, adapter_metadata(self.settings.adapter_config(), "trunk"))

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

    def hello(self, msg: Message) -> Message | None:
        """A silo's handshake for this round: verify it against the allow-list, keep the session."""
        if not isinstance(self.codec, SealedCodec):
            raise StepError("encryption_off", "this trunk runs without encryption; start the silo with --encryption false")
        raw = bytes(msg.tensors[0].numpy())
        if self.accepted_hellos.get(msg.silo_id) == raw:
            return None  # the same hello again (replayed to us by the broker): the session stands
        session = accept_hello(
            raw, self.keys, lambda silo: retry_redis(self.directory.lookup, silo),
            self.settings.run_id, allowed_ciphers=(self.settings.cipher,), guard=self.hello_guard,
            sender_slot=self.sender_slot, max_tensor_bytes=self.settings.max_tensor_bytes,
            config_digest=self._hello_config_digest(msg))
        if (session.silo_id, session.round) != (msg.silo_id, msg.round):
            raise SealError("wrong_session", "hello contents do not match its header")
        self.codec.sessions.add(session)
        self.accepted_hellos[msg.silo_id] = raw
        log.info("session with %s for round %d (%s)", session.silo_id, session.round, session.cipher)
        ack = torch.frombuffer(bytearray(session.ack()), dtype=torch.uint8)
        return Message(Kind.HELLO_ACK, msg.run_id, msg.silo_id, msg.round, msg.step, tensors=[ack])

    def _hello_config_digest(self, msg: Message) -> str | None:
        """The run config digest a silo's hello must be signed over: the fields it claims (in the
        HELLO's text), with THIS trunk's values, so a claim altered on the way fails the signature.
        None: the silo claims nothing (its signature then covers no digest)."""
        try:
            claim = parse_claim(msg.text)
        except ValueError as exc:
            raise StepError("bad_config", str(exc)) from None
        if claim is None:
            return None
        _, theirs = claim
        if diffs := differences(self.run_config, theirs):
            raise StepError("config_mismatch", describe(diffs, "trunk", "silo"))
        if unknown := sorted(set(theirs) - set(self.run_config)):
            raise StepError("config_mismatch", f"{', '.join(unknown)}: not a setting of this trunk")
        return config_digest({k: self.run_config[k] for k in theirs})

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
        if self.settings.checkpoint_dir is not None:
            self._save_checkpoint(rnd)
        self._send(Message(Kind.ROUND_DONE, self.settings.run_id, self.settings.worker_id, rnd))

    # ------------------------------------------------------------------ registration and recovery
    def _register(self) -> None:
        s = self.settings
        self._send(Message(Kind.READY, s.run_id, s.worker_id,
                           text=PeerIntro(self.incarnation, claim_line(self.run_config)).to_text()))

    def _on_sigterm(self, *_: object) -> None:
        """First SIGTERM: stop after the message in hand. Second: stop now. (Counted apart from
        _stopping: a --burst worker already stopping at the run's end is not on its second SIGTERM.)"""
        self._sigterms += 1
        if self._sigterms > 1:
            raise SystemExit(143)
        self._stopping = True

    @property
    def _checkpoints(self) -> Path:
        return self.settings.checkpoint_dir / self.settings.worker_id

    def _save_checkpoint(self, rnd: int) -> None:
        self.steps.save_checkpoint(self._checkpoints, rnd)

    def restore(self, rnd: int) -> None:
        """Go back to the end of round ``rnd`` (-1: the initial state): a role restarted."""
        self.steps.clear()
        if rnd == -1 and self.updates == 0:
            return  # nothing applied yet: this is the initial state
        if self.settings.checkpoint_dir is None:
            log.error("asked to resume from round %d but this worker keeps no checkpoints (--checkpoint-dir)", rnd)
            return
        try:
            updates = self.steps.load_checkpoint(self._checkpoints, rnd)
        except ValueError as exc:  # a checkpoint of another layout: say so, keep serving
            log.error("cannot resume from round %d: %s", rnd, exc)
            return
        if updates is None:
            log.error("no checkpoint of round %d in %s: cannot resume exactly", rnd, self._checkpoints)
            return
        self.steps.updates = updates
        log.info("resumed from the checkpoint of round %d (%d updates)", rnd, updates)

    def _send(self, msg: Message) -> None:
        frames = self.codec.encode(msg)
        with self.timeline.io():
            self.sock.send_multipart(frames, copy=False)
        self.metrics.sent(frames)


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
