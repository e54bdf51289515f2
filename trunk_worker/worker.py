"""The trunk worker: runs the middle blocks forward and backward for the silos' steps.

For each FORWARD it keeps the autograd graph (input h1 and output h2) until that step's BACKWARD
arrives, then back-propagates dL/dh2, steps the trunk's own optimizer and returns dL/dh1.
The worker never sees token ids, labels or the loss: only hidden states and their gradients.
"""

from __future__ import annotations

import logging
import signal
from collections import OrderedDict

import torch
import zmq

from shared.adapters import apply_adapter
from shared.model_split import build_part
from shared.optim import make_optimizer
from shared.protocol import WIRE_DTYPE_BY_NAME, Kind
from shared.registry import Heartbeat, Registry
from shared.settings import TrunkSettings
from shared.codec import PlainCodec
from shared.wire import FrameError, Message

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
        self.codec = PlainCodec(settings.max_tensor_bytes)  # the sealing layer replaces this
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, settings.worker_id.encode())
        self.sock.connect(settings.broker_backend)

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        s = self.settings
        self.registry.join("trunk", s.worker_id, device=str(self.device), adapter=s.adapter)
        heartbeat = Heartbeat(self.registry, "trunk", s.worker_id, s.heartbeat_s, s.liveness_ttl_s).start()
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stopping", True))
        self._send(Message(Kind.READY, s.run_id, s.worker_id))
        log.info("trunk worker %s up on %s (%d trainable tensors)", s.worker_id, self.device,
                 0 if self.optimizer is None else len(self.optimizer.param_groups[0]["params"]))
        try:
            while not self._stopping:
                if not self.sock.poll(POLL_MS):
                    continue
                frames = self.sock.recv_multipart(copy=False)
                self.handle([f.buffer for f in frames])
        finally:
            heartbeat.stop()
            self.registry.leave("trunk", s.worker_id, status="stopped")
            self.sock.close()
        log.info("trunk worker stopped after %d updates", self.updates)
        return 0

    def handle(self, frames: list) -> None:
        try:
            msg = self.codec.decode(frames)
        except FrameError as exc:
            self.registry.count_rejected(exc.reason)
            log.warning("rejected frame: %s", exc)
            return
        if msg.run_id != self.settings.run_id:
            self.registry.count_rejected("wrong_run")
            log.warning("rejected %s for run %s", msg.kind.name, msg.run_id)
            return
        try:
            if msg.kind == Kind.FORWARD:
                self._send(self.forward(msg))
            elif msg.kind == Kind.BACKWARD:
                self._send(self.backward(msg))
            elif msg.kind in (Kind.READY, Kind.HEARTBEAT):
                pass  # the broker acknowledging us
            else:
                raise StepError("unexpected_kind", msg.kind.name)
        except StepError as exc:
            self.registry.count_rejected(exc.reason)
            log.warning("step %s/%d rejected: %s", msg.silo_id, msg.step, exc)
            self._send(Message(Kind.ERROR, msg.run_id, msg.silo_id, msg.round, msg.step, text=str(exc)))

    # ------------------------------------------------------------------ the two halves of a step
    def forward(self, msg: Message) -> Message:
        hidden, mask, positions = msg.tensors
        if hidden.shape[-1] != self.hidden_size:
            raise StepError("schema", f"hidden size {hidden.shape[-1]}, trunk expects {self.hidden_size}")
        h1 = hidden.to(self.device, self.compute_dtype).requires_grad_(True)
        with torch.enable_grad():
            h2 = self.trunk(h1, mask.to(self.device, torch.long), positions.to(self.device, torch.long))
        self._remember((msg.silo_id, msg.step), h1, h2)
        return Message(Kind.FORWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                       tensors=[h2.detach().to(self.wire_dtype)])

    def backward(self, msg: Message) -> Message:
        key = (msg.silo_id, msg.step)
        if key not in self.pending:
            raise StepError("no_open_step", f"no forward pending for {msg.silo_id} step {msg.step}")
        h1, h2 = self.pending[key]
        grad = msg.tensors[0]
        if grad.shape != h2.shape:
            raise StepError("schema", f"gradient shape {tuple(grad.shape)} != output {tuple(h2.shape)}")
        del self.pending[key]
        h2.backward(grad.to(self.device, h2.dtype))
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return Message(Kind.BACKWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step, seq=self.updates,
                       tensors=[h1.grad.to(self.wire_dtype)])

    def _remember(self, key, h1, h2) -> None:
        self.pending[key] = (h1, h2)
        while len(self.pending) > self.settings.max_pending:
            old, _ = self.pending.popitem(last=False)
            log.warning("dropped the graph of %s step %d: more than %d pending", old[0], old[1], self.settings.max_pending)

    def _send(self, msg: Message) -> None:
        self.sock.send_multipart(self.codec.encode(msg), copy=False)
