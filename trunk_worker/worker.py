"""The trunk worker: runs the middle blocks forward and backward for the silos' steps.

For each FORWARD it keeps the autograd graph (input h1 and output h2) until that step's BACKWARD
arrives, then back-propagates dL/dh2, steps the trunk's own optimizer and returns dL/dh1.
The worker never sees token ids, labels or the loss: only hidden states and their gradients.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import OrderedDict

import torch
import zmq

from shared import keys as keystore
from shared.adapters import apply_adapter
from shared.codec import PlainCodec
from shared.metrics import RoleMetrics
from shared.model_split import build_part
from shared.optim import make_optimizer
from shared.protocol import WIRE_DTYPE_BY_NAME, Kind
from shared.registry import Heartbeat, Registry
from shared.sealed_codec import SealedCodec
from shared.sealing import HelloGuard, SealError, accept_hello
from shared.settings import TrunkSettings
from shared.transport import client_socket
from shared.wire import FrameError, Message, header_from_wire

log = logging.getLogger("trunk")

POLL_MS = 100


class StepError(Exception):
    """A well-formed message that cannot be served (no open step, wrong hidden size...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class TrunkWorker:
    def __init__(self, settings: TrunkSettings, registry: Registry, model_dir) -> None:
        self.settings = settings
        self.registry = registry
        self.device = torch.device(settings.device)
        self.wire_dtype = WIRE_DTYPE_BY_NAME[settings.wire_dtype]
        self.trunk = build_part(model_dir, "trunk", settings.head_layers, settings.tail_layers).to(self.device)
        trainable = apply_adapter(self.trunk, settings.adapter_config(), settings.seed)
        self.optimizer = make_optimizer(trainable, settings.lr, settings.weight_decay)
        self.hidden_size = self.trunk.config.hidden_size
        self.compute_dtype = next(self.trunk.parameters()).dtype
        self.pending: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.updates = 0
        self._stopping = False
        self.metrics = RoleMetrics("trunk", settings.worker_id, settings.metrics_port, settings.metrics_addr)
        self.codec = self._make_codec(settings, registry)
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
        keystore.publish_trunk_key(registry, self.keys.x25519_public)
        # Workers of one service share its key: each seals under its own nonce slot.
        self.sender_slot = keystore.claim_sender_slot(registry)
        self.hello_guard = HelloGuard()
        log.info("trunk service key %s", keystore.display_fingerprint(self.keys.fingerprint))
        return SealedCodec(settings.max_tensor_bytes)

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        s = self.settings
        self.registry.join("trunk", s.worker_id, device=str(self.device), adapter=s.adapter)
        heartbeat = Heartbeat(self.registry, "trunk", s.worker_id, s.heartbeat_s, s.liveness_ttl_s,
                              status_fn=lambda: {"updates": self.updates, "pending": len(self.pending)}).start()
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stopping", True))
        self._send(Message(Kind.READY, s.run_id, s.worker_id))
        log.info("trunk worker %s up on %s (%d trainable tensors)", s.worker_id, self.device,
                 0 if self.optimizer is None else len(self.optimizer.param_groups[0]["params"]))
        try:
            while not self._stopping:
                if not self.sock.poll(POLL_MS):
                    continue
                frames = self.sock.recv_multipart(copy=False)
                self.metrics.received(frames)
                self.handle([f.buffer for f in frames])
                self.metrics.queue_depth(len(self.pending))
        finally:
            heartbeat.stop()
            crypto_s = self.codec.crypto_seconds() if isinstance(self.codec, SealedCodec) else 0.0
            self.registry.update("trunk", s.worker_id, updates=self.updates, crypto_s=f"{crypto_s:.6f}")
            self.registry.leave("trunk", s.worker_id, status="stopped")
            self.sock.close()
        log.info("trunk worker stopped after %d updates", self.updates)
        return 0

    def handle(self, frames: list) -> None:
        try:
            msg = self.codec.decode(frames)
            if msg.run_id != self.settings.run_id:
                raise StepError("wrong_run", f"frame for run {msg.run_id}")
            if msg.kind == Kind.FORWARD:
                self._send(self.forward(msg))
            elif msg.kind == Kind.BACKWARD:
                self._send(self.backward(msg))
            elif msg.kind == Kind.HELLO:
                self._send(self.hello(msg))
            elif msg.kind in (Kind.READY, Kind.HEARTBEAT):
                pass  # the broker acknowledging us
            else:
                raise StepError("unexpected_kind", msg.kind.name)
        except (FrameError, StepError) as exc:
            self.registry.count_rejected(exc.reason)
            self.metrics.rejected(exc.reason)
            log.warning("rejected: %s", exc, extra={"reason": exc.reason})
            self._refuse(frames, str(exc))

    def _refuse(self, frames: list, reason: str) -> None:
        """Tell the silo named in the header why (in the clear: an ERROR carries no data)."""
        try:
            h = header_from_wire(frames[0], self.settings.max_tensor_bytes)
        except (FrameError, IndexError):
            return  # nobody to answer
        if h.kind != Kind.ERROR and h.run_id == self.settings.run_id:
            self._send(Message(Kind.ERROR, h.run_id, h.silo_id, h.round, h.step, text=reason))

    def hello(self, msg: Message) -> Message:
        """A silo's handshake for this round: verify it against the allow-list, keep the session."""
        if not isinstance(self.codec, SealedCodec):
            raise StepError("encryption_off", "this trunk runs without encryption; start the silo with --encryption false")
        session = accept_hello(
            bytes(msg.tensors[0].numpy()), self.keys, lambda silo: keystore.lookup(self.registry, silo),
            self.settings.run_id, allowed_ciphers=(self.settings.cipher,), guard=self.hello_guard,
            sender_slot=self.sender_slot, max_tensor_bytes=self.settings.max_tensor_bytes)
        if (session.silo_id, session.round) != (msg.silo_id, msg.round):
            raise SealError("wrong_session", "hello contents do not match its header")
        self.codec.sessions.add(session)
        log.info("session with %s for round %d (%s)", session.silo_id, session.round, session.cipher)
        ack = torch.frombuffer(bytearray(session.ack()), dtype=torch.uint8)
        return Message(Kind.HELLO_ACK, msg.run_id, msg.silo_id, msg.round, msg.step, tensors=[ack])

    # ------------------------------------------------------------------ the two halves of a step
    def forward(self, msg: Message) -> Message:
        hidden, mask, positions = msg.tensors
        if hidden.shape[-1] != self.hidden_size:
            raise StepError("schema", f"hidden size {hidden.shape[-1]}, trunk expects {self.hidden_size}")
        started = time.perf_counter()
        h1 = hidden.to(self.device, self.compute_dtype).requires_grad_(True)
        with torch.enable_grad():
            h2 = self.trunk(h1, mask.to(self.device, torch.long), positions.to(self.device, torch.long))
        self._remember((msg.silo_id, msg.step), h1, h2, time.perf_counter() - started)
        return Message(Kind.FORWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                       tensors=[h2.detach().to(self.wire_dtype)])

    def backward(self, msg: Message) -> Message:
        key = (msg.silo_id, msg.step)
        if key not in self.pending:
            raise StepError("no_open_step", f"no forward pending for {msg.silo_id} step {msg.step}")
        h1, h2, forward_s = self.pending[key]
        started = time.perf_counter()
        grad = msg.tensors[0]
        if grad.shape != h2.shape:
            raise StepError("schema", f"gradient shape {tuple(grad.shape)} != output {tuple(h2.shape)}")
        del self.pending[key]
        h2.backward(grad.to(self.device, h2.dtype))
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.metrics.step(forward_s + time.perf_counter() - started)
        applied = torch.tensor([self.updates], dtype=torch.int64)
        return Message(Kind.BACKWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                       tensors=[h1.grad.to(self.wire_dtype), applied])

    def _remember(self, key, h1, h2, forward_s: float) -> None:
        self.pending[key] = (h1, h2, forward_s)
        while len(self.pending) > self.settings.max_pending:
            old, _ = self.pending.popitem(last=False)
            log.warning("dropped the graph of %s step %d: more than %d pending", old[0], old[1], self.settings.max_pending)

    def _send(self, msg: Message) -> None:
        frames = self.codec.encode(msg)
        self.sock.send_multipart(frames, copy=False)
        self.metrics.sent(frames)
