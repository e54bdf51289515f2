"""The silo agent: owns the data, the head and tail parts, the labels, the loss and its optimizer.

One training step, top to bottom:

    ids -> embed + head blocks -> h1 ==FORWARD==> trunk -> h2 ==FORWARD_RESULT==> tail -> loss
    loss.backward() gives dL/dh2 ==BACKWARD==> trunk backward ==BACKWARD_RESULT==> dL/dh1
    h1.backward(dL/dh1), optimizer step

Only h1, the 2-D mask, positions and dL/dh2 leave the silo; token ids, labels and loss never do
(the loss goes to Redis for monitoring only when ``report_loss`` is on, published by the heartbeat
thread, never from the step itself).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import zmq
from safetensors.torch import save_file

from shared import keys as keystore
from shared.adapters import adapter_state_dict, apply_adapter
from shared.codec import PlainCodec
from shared.data import SiloDataset, load_jsonl
from shared.loss import causal_lm_loss
from shared.metrics import RoleMetrics
from shared.model_split import build_silo_parts, positions_from_mask
from shared.optim import make_optimizer
from shared.protocol import WIRE_DTYPE_BY_NAME, Kind
from shared.registration import sign_registration
from shared.registry import Heartbeat, Registry
from shared.sealed_codec import SealedCodec
from shared.sealing import make_hello
from shared.settings import SiloSettings
from shared.tokenizer import load_tokenizer
from shared.transport import client_socket
from shared.wire import FrameError, Message

log = logging.getLogger("silo")


class PeerError(RuntimeError):
    """The broker or trunk refused a step or stopped answering."""


class SiloAgent:
    def __init__(self, settings: SiloSettings, registry: Registry, model_dir: Path) -> None:
        if settings.data is None:
            raise ValueError("a silo needs training data: --data FILE.jsonl (or SPLITFED_DATA)")
        self.settings = settings
        self.registry = registry
        self.wire_dtype = WIRE_DTYPE_BY_NAME[settings.wire_dtype]
        tokenizer = load_tokenizer(model_dir)
        self.dataset = SiloDataset(
            load_jsonl(settings.data), tokenizer, settings.batch_size, settings.max_length, settings.seed, settings.silo_index
        )
        self.head, self.tail = build_silo_parts(model_dir, settings.head_layers, settings.tail_layers)
        cfg = settings.adapter_config()
        trainable = apply_adapter(self.head, cfg, settings.seed) + apply_adapter(self.tail, cfg, settings.seed)
        self.optimizer = make_optimizer(trainable, settings.lr, settings.weight_decay)
        self.history: list[dict] = []
        self._stopping = False
        self.metrics = RoleMetrics("silo", settings.silo_id, settings.metrics_port, settings.metrics_addr)
        self.codec = self._make_codec(settings)
        self.crypto_s = 0.0
        self.ctx = zmq.Context.instance()
        self.sock = client_socket(self.ctx, settings.silo_id, settings.broker_frontend, settings.curve, settings.curve_cert,
                                  settings.curve_broker_key)

    def _make_codec(self, settings: SiloSettings):
        if not settings.encryption:
            log.warning("encryption is OFF: this silo's activations cross the network in the clear")
            return PlainCodec(settings.max_tensor_bytes)
        if settings.keys_dir is None:
            raise ValueError("encryption is on: pass --keys-dir with this silo's keys "
                             "(`splitfed keys gen --role silo --out DIR`, then enroll them)")
        if not settings.trunk_fingerprint:
            raise ValueError("encryption is on: pin the trunk service key with --trunk-fingerprint sha256:... "
                             "(the operator's `splitfed keys fingerprint DIR` prints it)")
        self.keys = keystore.load_silo_keys(settings.keys_dir)
        return SealedCodec(settings.max_tensor_bytes)

    def _handshake(self, rnd: int, step: int) -> None:
        """A fresh session key each round: a leaked key exposes one round at most."""
        s = self.settings
        hello, pending = make_hello(self.keys, s.silo_id, s.run_id, rnd, cipher=s.cipher,
                                    max_tensor_bytes=s.max_tensor_bytes)
        self._send(Message(Kind.HELLO, s.run_id, s.silo_id, rnd, step,
                           tensors=[torch.frombuffer(bytearray(hello), dtype=torch.uint8)]))
        ack = self._await(Kind.HELLO_ACK, step)
        # Raises SealError("fingerprint_mismatch") unless the trunk holds the key pinned in our settings.
        self.codec.sessions.add(pending.complete_ack(bytes(ack.tensors[0].numpy()), s.trunk_fingerprint))
        log.info("round %d: session established with trunk %s", rnd, s.trunk_fingerprint[:23])

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        s = self.settings
        self.registry.join("silo", s.silo_id, samples=len(self.dataset), steps=s.steps)
        heartbeat = Heartbeat(self.registry, "silo", s.silo_id, s.heartbeat_s, s.liveness_ttl_s,
                              status_fn=self._progress_fields).start()
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stopping", True))
        started = time.perf_counter()
        try:
            self._register()
            progress = _progress_bar(s.steps, s.silo_id)
            for step in range(s.steps):
                if self._stopping:
                    log.info("stopping after step %d on SIGTERM", step - 1)
                    break
                loss = self.train_step(step)
                if progress is not None:
                    progress.set_postfix(round=step // s.local_steps, loss=f"{loss:.4f}", refresh=False)
                    progress.update(1)
            if progress is not None:
                progress.close()
            self._send(Message(Kind.DISCONNECT, s.run_id, s.silo_id))
            if fields := self._progress_fields():  # the last step, which the heartbeat may not have seen
                self.registry.update("silo", s.silo_id, **fields)
            self.registry.leave("silo", s.silo_id, status="finished")
        finally:
            heartbeat.stop()
            self.sock.close()
        self._write_results(time.perf_counter() - started)
        return 0

    def _progress_fields(self) -> dict:
        """The latest step for `splitfed status` and the demo (empty before the first step)."""
        if not self.settings.report_loss or not self.history:
            return {}
        last = self.history[-1]
        return {"round": last["round"], "step": last["step"], "loss": f"{last['loss']:.6f}",
                "updated_at": f"{time.time():.3f}"}

    def _register(self) -> None:
        """READY until accepted. After a restart the broker may still hold our old connection:
        it frees the id once that one has been silent for liveness_ttl_s, so retry with back-off."""
        s = self.settings
        delay, deadline = 0.25, time.monotonic() + 3 * s.liveness_ttl_s
        while True:
            token = []
            if isinstance(self.codec, SealedCodec):  # prove we hold the enrolled identity
                raw = sign_registration(self.keys, s.run_id, s.silo_id)
                token = [torch.frombuffer(bytearray(raw), dtype=torch.uint8)]
            self._send(Message(Kind.READY, s.run_id, s.silo_id, tensors=token))
            try:
                self._await(Kind.READY, step=0)
                break
            except PeerError as exc:
                if "identity_taken" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
                log.info("the broker still holds %s's previous connection; retrying in %.2fs", s.silo_id, delay)
                time.sleep(delay)
                delay *= 2
        log.info("silo %s registered with the broker (%d examples)", s.silo_id, self.dataset.num_examples)

    # ------------------------------------------------------------------ one training step
    def train_step(self, step: int) -> float:
        s = self.settings
        started = time.perf_counter()
        rnd = step // s.local_steps
        if isinstance(self.codec, SealedCodec) and step % s.local_steps == 0:
            self._handshake(rnd, step)
        batch = self.dataset.batch(step)
        mask = batch.attention_mask
        positions = positions_from_mask(mask)

        h1 = self.head(batch.input_ids, mask, positions)
        self._send(Message(Kind.FORWARD, s.run_id, s.silo_id, rnd, step, tensors=[
            h1.detach().to(self.wire_dtype), mask.to(torch.uint8), positions.to(torch.int32)]))
        reply = self._await(Kind.FORWARD_RESULT, step)

        h2 = reply.tensors[0].to(h1.dtype).requires_grad_(True)
        logits = self.tail(h2, mask, positions)
        loss = causal_lm_loss(logits, batch.labels)
        loss.backward()  # grads of the tail (and tied LM head) and dL/dh2

        self._send(Message(Kind.BACKWARD, s.run_id, s.silo_id, rnd, step, tensors=[h2.grad.to(self.wire_dtype)]))
        reply = self._await(Kind.BACKWARD_RESULT, step)

        h1.backward(reply.tensors[0].to(h1.dtype))  # grads of the head
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        value = float(loss.detach())
        self.history.append({"round": rnd, "step": step, "loss": value, "trunk_seq": int(reply.tensors[1][0])})
        self.metrics.step(time.perf_counter() - started)
        # On a terminal the progress bar shows each step; a log line would tear it.
        log.log(logging.DEBUG if sys.stderr.isatty() else logging.INFO, "round %d step %d loss %.4f", rnd, step, value,
                extra={"silo": s.silo_id, "round": rnd, "step": step, "loss": value})
        return value

    # ------------------------------------------------------------------ messaging
    def _send(self, msg: Message) -> None:
        frames = self.codec.encode(msg)
        self.sock.send_multipart(frames, copy=False)
        self.metrics.sent(frames)

    def _await(self, kind: Kind, step: int) -> Message:
        """Wait for ``kind`` of ``step``; stale or malformed replies are dropped, ERROR raises."""
        s = self.settings
        deadline = time.monotonic() + s.step_timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise PeerError(f"no {kind.name} for step {step} within {s.step_timeout_s:.0f}s "
                                f"(is the broker at {s.broker_frontend} up, with a trunk worker?)")
            if not self.sock.poll(min(left_ms, int(s.heartbeat_s * 1000))):
                # Waiting for our turn: tell the broker this connection is alive.
                self._send(Message(Kind.HEARTBEAT, s.run_id, s.silo_id))
                continue
            frames = self.sock.recv_multipart(copy=False)
            self.metrics.received(frames)
            try:
                msg = self.codec.decode([f.buffer for f in frames])
            except FrameError as exc:
                self.registry.count_rejected(exc.reason)
                self.metrics.rejected(exc.reason)
                log.warning("rejected frame from the broker: %s", exc)
                continue
            if msg.kind == Kind.ERROR:
                raise PeerError(f"step {msg.step} refused: {msg.text}")
            if msg.kind == kind and (kind == Kind.READY or msg.step == step):
                return msg
            log.warning("dropped unexpected %s for step %d while waiting for %s of step %d", msg.kind.name, msg.step, kind.name, step)

    # ------------------------------------------------------------------ results
    def _write_results(self, wall_s: float) -> None:
        s = self.settings
        if s.save_dir is not None:
            s.save_dir.mkdir(parents=True, exist_ok=True)
            tensors = {**adapter_state_dict(self.head), **adapter_state_dict(self.tail)}
            tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
            _atomic(s.save_dir / f"{s.silo_id}.safetensors", lambda p: save_file(tensors, str(p)))
        if s.results is not None:
            crypto_s = self.codec.crypto_seconds() if isinstance(self.codec, SealedCodec) else 0.0
            doc = {"silo_id": s.silo_id, "silo_index": s.silo_index, "steps": self.history, "wall_s": wall_s,
                   "encryption": isinstance(self.codec, SealedCodec), "crypto_s": crypto_s}
            _atomic(s.results, lambda p: p.write_text(json.dumps(doc, indent=1)))


def _progress_bar(total: int, silo_id: str):
    """A tqdm bar when a person watches (stderr is a terminal); log lines otherwise."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=silo_id, unit="step", dynamic_ncols=True)


def _atomic(path: Path, write) -> None:
    """Write to a temporary name and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
