"""The trunk worker: runs the middle blocks forward and backward for the silos' steps.

For each FORWARD it keeps the autograd graph (input h1 and output h2) until that step's BACKWARD
arrives, then back-propagates dL/dh2, steps the trunk's own optimizer and returns dL/dh1.
The worker never sees token ids, labels or the loss: only hidden states and their gradients.
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
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from shared import checkpoint
from shared import enrollment
from shared import keys as keystore
from shared.adapter_files import adapter_metadata, save_adapter_file
from shared.adapters import adapter_state_dict, apply_adapter
from shared.codec import PlainCodec
from shared.control_text import PeerIntro, ResumePoint, RoundEnd
from shared.handshake import HelloGuard, accept_hello
from shared.metrics import RoleMetrics
from shared.optim import make_optimizer
from shared.protocol import BROKER_LIVENESS, GENERATION_KINDS, WIRE_DTYPE_BY_NAME, ErrorReason, Kind, Reason
from shared.registry import Heartbeat, Registry, retry_redis
from shared.run_config import ConfigMismatch, claim_line, config_digest, describe, differences, parse_claim, run_config
from shared.sealed_codec import SealedCodec
from shared.sealing import SealError
from shared.settings import TrunkSettings
from shared.step_timeline import StepTimeline
from shared.transport import client_socket
from shared.wire import FrameError, Message, bundle_from_wire, header_from_wire, split_frames
from trunk_worker.batch_step import BatchSteps
from trunk_worker.base_model import load_trunk_base
from trunk_worker.beacon import Beacon
from trunk_worker.checkpointing import load_trunk, save_trunk
from trunk_worker.generation import GenerationError, TrunkGenerations
from trunk_worker.pending_graphs import PendingGraphs
from trunk_worker.silo_adapters import SiloAdapters
from trunk_worker.trunk_sync import TrunkSync

log = logging.getLogger("trunk")

POLL_MS = 100


class StepError(Exception):
    """A well-formed message that cannot be served (no open step, wrong hidden size...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TrunkWorker:
    def __init__(self, settings: TrunkSettings, registry: Registry, model_dir) -> None:
        self.settings = settings
        self.registry = registry
        self.wire_dtype = WIRE_DTYPE_BY_NAME[settings.wire_dtype]
        self.trunk, self.device = load_trunk_base(model_dir, settings)  # device: where its inputs go
        self.trainable = apply_adapter(self.trunk, settings.adapter_config(), settings.seed)
        self.hidden_size = self.trunk.config.hidden_size
        self.compute_dtype = WIRE_DTYPE_BY_NAME[settings.dtype]  # the base's (adapters are fp32 masters)
        self.adapters: SiloAdapters | None = None
        self.batches: BatchSteps | None = None
        if settings.mode == "hierarchical":
            if settings.adapter == "full":
                raise ValueError("hierarchical mode keeps one trunk ADAPTER per silo: use --adapter lora or prefix")
            self.adapters = SiloAdapters(self.trunk, settings.lr, settings.weight_decay)
            self.optimizer = None  # one per silo, in self.adapters
        else:
            self.optimizer = make_optimizer(self.trainable, settings.lr, settings.weight_decay)
        if settings.mode == "client-batch":
            self.batches = BatchSteps(self.trunk, self.device, self.compute_dtype, settings.straggler_timeout_s)
        self.generations = TrunkGenerations(self.trunk, self.device, self.wire_dtype, compute_dtype=self.compute_dtype)
        self.pending = PendingGraphs(settings.max_pending)
        self.updates = 0
        self.recomputed_steps = 0  # forwards kept as inputs only (--recompute-forward)
        # Each silo's last applied step with its BACKWARD_RESULT and FORWARD_RESULT, for a retried
        # step: a silo sends step n+1 only after step n's result, so the last one is the only one
        # that can come again. Its FORWARD gets the kept output (running it again through the updated
        # trunk would hand the silo another h2 than the one the kept dL/dh1 belongs to).
        self.applied: dict[str, tuple[int, Message, Message | None]] = {}
        self.forwarded: dict[str, tuple[int, int, Message]] = {}  # silo -> (step, FORWARDs of it, last output)
        self.accepted_hellos: dict[str, bytes] = {}
        self.heard_at = time.monotonic()  # the broker heartbeats us every heartbeat_s
        self.broker_down = False
        self.incarnation = secrets.token_hex(4)  # tells the broker this process is new (a restart)
        self.run_config = run_config(settings)  # what READY claims and silos' HELLOs must agree with
        self._stopping = False
        self._sigterms = 0
        self.metrics = RoleMetrics("trunk", settings.worker_id, settings.metrics_port, settings.metrics_addr)
        self.keys = None
        self.codec = self._make_codec(settings, registry)
        self.timeline = StepTimeline(self.codec, self.metrics)  # per-step parts, for `bench step`
        self.sync = TrunkSync(settings.run_id, settings.worker_id, self.keys)
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
        self.registry.join("trunk", s.worker_id, device=str(self.device), adapter=s.adapter)
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
        log.info("trunk worker %s up on %s (%d trainable tensors)", s.worker_id, self.device,
                 0 if self.optimizer is None else len(self.optimizer.param_groups[0]["params"]))
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
                if self.batches is not None:
                    for bundle in self.batches.expired():
                        self._finish_bundle(bundle)
        finally:
            heartbeat.stop()
            beacon.stop()
            if s.save_dir is not None:
                self._save_adapters(s.save_dir)
            crypto_s = self.codec.crypto_seconds() if isinstance(self.codec, SealedCodec) else 0.0
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            self.registry.update("trunk", s.worker_id, updates=self.updates, recomputed_steps=self.recomputed_steps,
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
        """The trunk's adapter for `splitfed eval` / `splitfed export`: trunk.safetensors. In
        hierarchical mode that is the last round's average (the adapter new silos start from), and
        each silo's own goes to trunk-<silo>.safetensors too: they differ under --personalize or
        --aggregation none, where no average exists and only the per-silo files are written."""
        meta = adapter_metadata(self.settings.adapter_config(), "trunk")
        if self.adapters is None:
            save_adapter_file(directory / "trunk.safetensors", adapter_state_dict(self.trunk), meta)
            return
        names = self.adapters.names
        if self.adapters.averaged:
            save_adapter_file(directory / "trunk.safetensors", dict(zip(names, self.adapters.template)), meta)
        for silo, params in sorted(self.adapters.params.items()):
            save_adapter_file(directory / f"trunk-{silo}.safetensors", dict(zip(names, params)), meta)
        log.info("wrote the trunk adapters of %d silos%s to %s", len(self.adapters.params),
                 " and their average" if self.adapters.averaged else " (no round averaged them: no trunk.safetensors)",
                 directory)

    def handle(self, frames: list) -> None:
        try:
            header = header_from_wire(frames[0], self.settings.max_tensor_bytes)
            if header.kind == Kind.BUNDLE:
                return self.bundle(frames)
            # the header is parsed here, once: split_frames, the codec and the session reuse it
            msg = self.codec.decode(frames, split_frames(frames, self.settings.max_tensor_bytes, header))
            if msg.run_id != self.settings.run_id:
                raise StepError("wrong_run", f"frame for run {msg.run_id}")
            if msg.kind == Kind.FORWARD:
                self._send(self.forward(msg))
            elif msg.kind == Kind.BACKWARD and self.batches is not None:
                self.batch_backward(msg)
            elif msg.kind == Kind.BACKWARD:
                self._send(self.backward(msg))
            elif msg.kind == Kind.HELLO:
                if (ack := self.hello(msg)) is not None:
                    self._send(ack)
            elif msg.kind == Kind.ROUND_END:
                self.round_end(msg)
            elif msg.kind == Kind.TRUNK_SYNC:
                self.trunk_sync(msg)
            elif msg.kind == Kind.READY:  # the broker's ack: where the run stands
                self.restore(_resume_round(msg.text))
            elif msg.kind == Kind.ROLLBACK:
                self.restore(_resume_round(msg.text))
                self._register()  # the broker counts our frames again once this READY arrives
            elif msg.kind == Kind.ERROR and ErrorReason.from_text(msg.text).code == Reason.CONFIG_MISMATCH:
                raise ConfigMismatch(f"the broker refused this trunk worker: {msg.text}")
            elif msg.kind == Kind.ERROR and ErrorReason.from_text(msg.text).code == Reason.REGISTER:
                log.warning("the broker does not know us (%s): registering again", msg.text)
                self._register()
            elif msg.kind == Kind.HEARTBEAT:
                pass
            elif msg.kind == Kind.DISCONNECT:  # the broker: every silo has finished
                if self.settings.burst:
                    log.info("the run is finished: exiting (--burst)")
                    self._stopping = True
                else:
                    log.info("the run is finished; serving on until SIGTERM (--burst exits here)")
            elif msg.kind in GENERATION_KINDS:  # split generation (trunk_worker/generation.py)
                if self.adapters is not None and msg.kind == Kind.GENERATE:
                    self.adapters.activate_for_generation(msg.silo_id)  # its own trunk adapter, not the last one used
                if (reply := self.generations.handle(msg)) is not None:
                    self._send(reply)
            else:
                raise StepError("unexpected_kind", msg.kind.name)
        except (FrameError, StepError, GenerationError) as exc:
            self.registry.count_rejected(exc.reason)
            self.metrics.rejected(exc.reason)
            log.warning("rejected: %s", exc, extra={"reason": exc.reason})
            self._refuse(frames, ErrorReason(exc.reason, getattr(exc, "detail", "")))

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
            raw, self.keys, lambda silo: retry_redis(enrollment.lookup, self.registry, silo),
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

    # ------------------------------------------------------------------ the two halves of a step
    def forward(self, msg: Message) -> Message:
        last_applied = self.applied.get(msg.silo_id)
        if last_applied is not None and last_applied[0] == msg.step and last_applied[2] is not None:
            log.warning("%s step %d already applied: answering its FORWARD again with the kept output", msg.silo_id,
                        msg.step)
            return last_applied[2]
        hidden, mask, positions = msg.tensors
        if hidden.shape[-1] != self.hidden_size:
            raise StepError("schema", f"hidden size {hidden.shape[-1]}, trunk expects {self.hidden_size}")
        started = time.perf_counter()
        if self.adapters is not None:
            self.adapters.activate(msg.silo_id)  # this silo's own trunk adapter over the shared base
        h1 = hidden.to(self.device, self.compute_dtype).requires_grad_(True)
        inputs = (h1, mask.to(self.device, torch.long), positions.to(self.device, torch.long))
        with torch.enable_grad():
            if self.settings.recompute_forward:
                # Keep only the inputs; the forward runs again inside this step's backward (torch's
                # activation checkpointing; the same kernels give the same h2, bit for bit). Backwards
                # run one at a time, so one step's activations exist at a time, however many are open.
                h2 = torch_checkpoint(self.trunk, *inputs, use_reentrant=False)
                self.recomputed_steps += 1
            else:
                h2 = self.trunk(*inputs)
        self._remember((msg.silo_id, msg.step), h1, h2, time.perf_counter() - started)
        result = Message(Kind.FORWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                         tensors=[h2.detach().to(self.wire_dtype)])
        previous = self.forwarded.get(msg.silo_id)
        count = previous[1] + 1 if previous is not None and previous[0] == msg.step else 1
        self.forwarded[msg.silo_id] = (msg.step, count, result)
        return result

    def backward(self, msg: Message) -> Message:
        key = (msg.silo_id, msg.step)
        last_applied = self.applied.get(msg.silo_id)
        if last_applied is not None and last_applied[0] == msg.step:  # a retry: same answer, no second update
            log.warning("%s step %d already applied: answering again without applying", *key)
            return last_applied[1]
        if key not in self.pending:
            raise StepError("no_open_step", f"no forward pending for {msg.silo_id} step {msg.step}")
        h1, h2, forward_s = self.pending.first(key)
        started = time.perf_counter()
        grad = msg.tensors[0]
        if grad.shape != h2.shape:
            raise StepError("schema", f"gradient shape {tuple(grad.shape)} != output {tuple(h2.shape)}")
        _, last = self.pending.pop(key)
        if self.adapters is not None and self.settings.recompute_forward:
            self.adapters.activate(msg.silo_id)  # the recomputed forward runs through the adapter in the slots now
        h2.backward(grad.to(self.device, h2.dtype))
        if not last:  # a micro-batch: its gradients accumulate until the step's last one
            return Message(Kind.BACKWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                           tensors=[h1.grad.to(self.wire_dtype), torch.tensor([self.updates], dtype=torch.int64)])
        optimizer = self.optimizer if self.adapters is None else self.adapters.optimizers[msg.silo_id]
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.timeline.step_done_after_busy(msg.step)
        self.metrics.step(forward_s + time.perf_counter() - started)
        applied = torch.tensor([self.updates], dtype=torch.int64)
        result = Message(Kind.BACKWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                         tensors=[h1.grad.to(self.wire_dtype), applied])
        forwarded = self.forwarded.pop(msg.silo_id, None)
        # A step of micro-batches had several outputs: a retry of it gets no kept output (it runs again).
        kept = forwarded[2] if forwarded is not None and forwarded[:2] == (msg.step, 1) else None
        self.applied[msg.silo_id] = (msg.step, result, kept)
        return result

    # ------------------------------------------------------------------ client-batch
    def bundle(self, frames: list) -> None:
        """Open each member (a bad one is refused alone), run them as one trunk batch."""
        _, member_frames = bundle_from_wire(frames, self.settings.max_tensor_bytes)
        members = []
        for mf in member_frames:
            try:
                msg = self.codec.decode(mf)
                if msg.kind != Kind.FORWARD or msg.run_id != self.settings.run_id:
                    raise StepError("schema", f"bundle member {msg.kind.name} of run {msg.run_id}")
                if msg.tensors[0].shape[-1] != self.hidden_size:
                    raise StepError("schema", f"hidden size {msg.tensors[0].shape[-1]}, trunk expects {self.hidden_size}")
                members.append(msg)
            except (FrameError, StepError) as exc:
                self.registry.count_rejected(exc.reason)
                log.warning("bundle member rejected: %s", exc)
                self._refuse(mf, str(exc))
        if not members:
            return
        _, outputs = self.batches.forward(members)
        for m, out in zip(members, outputs):
            self._send(Message(Kind.FORWARD_RESULT, m.run_id, m.silo_id, m.round, m.step, tensors=[out.to(self.wire_dtype)]))

    def batch_backward(self, msg: Message) -> None:
        if not self.batches.shape_ok(msg):
            raise StepError("no_open_step", f"no trunk batch open for {msg.silo_id} step {msg.step} "
                            "(or a gradient of the wrong shape)")
        bundle = self.batches.add_grad(msg)
        if bundle.complete():
            self._finish_bundle(bundle)

    def _finish_bundle(self, bundle) -> None:
        started = time.perf_counter()
        missing = [m for m in bundle.members if m.silo_id not in bundle.grads]
        if len(missing) == len(bundle.members):
            for m in bundle.members:  # nothing came back: no update at all
                self.batches.by_member.pop((m.silo_id, m.step), None)
        else:
            grads = self.batches.backward(bundle, self.trainable)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
            self.metrics.step(bundle.forward_s + time.perf_counter() - started)
            applied = torch.tensor([self.updates], dtype=torch.int64)
            for m in bundle.members:
                if m.silo_id in grads:
                    self._send(Message(Kind.BACKWARD_RESULT, m.run_id, m.silo_id, m.round, m.step,
                                       tensors=[grads[m.silo_id].to(self.wire_dtype), applied]))
        for m in missing:
            log.warning("straggler: %s step %d sent no gradient within %.0fs; its slice counted as zero",
                        m.silo_id, m.step, self.settings.straggler_timeout_s, extra={"reason": "straggler"})
            self._send(Message(Kind.ERROR, m.run_id, m.silo_id, m.round, m.step,
                               text=ErrorReason.of(Reason.STRAGGLER, f"no gradient within "
                                                   f"{self.settings.straggler_timeout_s:.0f}s").to_text()))

    # ------------------------------------------------------------------ hierarchical round end
    def round_end(self, msg: Message) -> None:
        """Every round step is applied: average the trunk adapters across workers when asked
        (hierarchical: send this worker's weighted partial sum to every averaging worker), then
        checkpoint the round. A second ROUND_END for the round (a worker died before its partial
        came) starts the averaging again: partials of the first attempt are dropped."""
        self.sync.forget(msg.round)
        # Every silo of the round has its last result (it joined the round's end after it): no retry
        # can come, and the worker is at its fullest now, so drop the kept results before averaging.
        self.applied.clear()
        self.forwarded.clear()
        if not msg.text:
            return self._close_round(msg.round)
        if self.adapters is None:
            raise StepError("unexpected_kind", "trunk averaging outside hierarchical mode")
        end = RoundEnd.from_text(msg.text)
        workers, weights = list(end.workers), end.weights
        partial, weight = self.adapters.weighted_sum(weights)
        if workers == [self.settings.worker_id]:
            # The only averaging worker: its partial is the whole sum. No TRUNK_SYNC round trip, and
            # no sealed and opened copies of an adapter-sized buffer at the worker's fullest moment.
            if weight <= 0:  # none of the round's silos trained here: nothing to average
                log.warning("round %d: no trunk adapter of %s on this worker; nothing averaged",
                            msg.round, ",".join(sorted(weights)))
                return self._close_round(msg.round)
            return self._apply_average(msg.round, partial.div_(weight))
        self.sync.expected[msg.round] = workers
        self._send(Message(Kind.TRUNK_SYNC, msg.run_id, self.settings.worker_id, msg.round,
                           tensors=[self.sync.seal(msg.round, partial, weight)]))

    def trunk_sync(self, msg: Message) -> None:
        if self.adapters is None:
            raise StepError("unexpected_kind", "TRUNK_SYNC outside hierarchical mode")
        average = self.sync.add(msg.round, msg.silo_id, self.sync.open(msg.round, msg.silo_id, msg.tensors[0]))
        if average is not None:
            self._apply_average(msg.round, average)

    def _apply_average(self, rnd: int, average: torch.Tensor) -> None:
        self.adapters.set_all(average)
        log.info("round %d: trunk adapters averaged", rnd)
        self._close_round(rnd)

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
        save_trunk(self._checkpoints, rnd, self.trainable, self.optimizer, self.adapters, self.updates)

    def restore(self, rnd: int) -> None:
        """Go back to the end of round ``rnd`` (-1: the initial state): a role restarted."""
        self.pending.clear()
        self.applied.clear()
        self.forwarded.clear()
        if self.batches is not None:
            self.batches.by_member.clear()
        self.sync.expected.clear()
        self.sync.partials.clear()
        if rnd == -1 and self.updates == 0:
            return  # nothing applied yet: this is the initial state
        if self.settings.checkpoint_dir is None:
            log.error("asked to resume from round %d but this worker keeps no checkpoints (--checkpoint-dir)", rnd)
            return
        try:
            updates = load_trunk(self._checkpoints, rnd, self.trainable, self.optimizer, self.adapters)
        except ValueError as exc:  # a checkpoint of another layout: say so, keep serving
            log.error("cannot resume from round %d: %s", rnd, exc)
            return
        if updates is None:
            log.error("no checkpoint of round %d in %s: cannot resume exactly", rnd, self._checkpoints)
            return
        self.updates = updates
        log.info("resumed from the checkpoint of round %d (%d updates)", rnd, updates)

    def _remember(self, key, h1, h2, forward_s: float) -> None:
        for old in self.pending.add(key, (h1, h2, forward_s)):
            log.warning("dropped the graph of %s step %d: more than %d pending", old[0], old[1], self.settings.max_pending)

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
