"""The silo agent: owns the data, the head and tail parts, the labels, the loss and its optimizer.

One training step, top to bottom:

    ids -> embed + head blocks -> h1 ==FORWARD==> trunk -> h2 ==FORWARD_RESULT==> tail -> loss
    loss.backward() gives dL/dh2 ==BACKWARD==> trunk backward ==BACKWARD_RESULT==> dL/dh1
    h1.backward(dL/dh1), optimizer step

Only h1, the 2-D mask, positions and dL/dh2 leave the silo; token ids, labels and loss never do
(the loss goes to the broker for monitoring only when ``report_loss`` is on, in a PROGRESS report
at most once a heartbeat period). A silo has one connection, to the broker: no Redis.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import zmq
from safetensors.torch import save_file

from shared.state import checkpoint
from shared.crypto import keys as keystore
from shared.state.atomic_files import atomic_path
from shared.model.adapters import adapter_state_dict, apply_adapter, unique_parameters
from shared.wire.codec import PlainCodec
from shared.wire.control_text import MAX_REJECTED_REASONS, PeerIntro, SiloReport
from shared.model.cut_defense import CutDefenseConfig, protect_cut_with
from shared.data.dataset import SiloDataset, load_jsonl
from shared.crypto.handshake import make_hello
from shared.model.loss import causal_lm_loss
from shared.runtime.metrics import RoleMetrics
from shared.model.model_split import build_silo_parts, positions_from_mask
from shared.model.optim import make_optimizer
from shared.crypto.peer_keys import HandedKeys
from shared.wire.protocol import WIRE_DTYPE_BY_NAME, ErrorReason, Kind, Reason
from shared.crypto.registration import sign_registration
from shared.state.run_config import ConfigMismatch, claim_line, config_digest, run_config
from shared.crypto.sealed_codec import SealedCodec
from shared.crypto.sealing import SealError
from shared.runtime.settings import SiloSettings
from shared.runtime.step_timeline import StepTimeline
from shared.data.tokenizer import load_tokenizer
from shared.wire.transport import client_socket
from shared.wire.wire import FrameError, Message
from silo_agent.aggregation import RoundAggregation
from silo_agent.broker_liveness import BrokerLiveness
from silo_agent.generation import generate_live
from silo_agent.microbatch import run_microbatched_step
from silo_agent.peer_errors import IdentityTaken, PeerError, Reregister, Retry, Rollback, Straggler, resume_round  # noqa: F401

log = logging.getLogger("silo")

MAX_STEP_ATTEMPTS = 3


class SiloAgent:
    def __init__(self, settings: SiloSettings, model_dir: Path) -> None:
        if settings.data is None:
            raise ValueError("a silo needs training data: --data FILE.jsonl (or SPLITFED_DATA)")
        self.settings = settings
        self.rejected: Counter[str] = Counter()  # frames refused since the last report
        self._reported_at = 0.0
        self.wire_dtype = WIRE_DTYPE_BY_NAME[settings.wire_dtype]
        tokenizer = load_tokenizer(model_dir)
        self.dataset = SiloDataset(
            load_jsonl(settings.data), tokenizer, settings.batch_size, settings.max_length, settings.seed, settings.silo_index
        )
        self.head, self.tail = build_silo_parts(model_dir, settings.head_layers, settings.tail_layers,
                                                dtype=WIRE_DTYPE_BY_NAME[settings.dtype])
        cfg = settings.adapter_config()
        trainable = unique_parameters(apply_adapter(self.head, cfg, settings.seed), apply_adapter(self.tail, cfg, settings.seed))
        self.optimizer = make_optimizer(trainable, settings.lr, settings.weight_decay)
        self.trainable = trainable
        self.history: list[dict] = []
        self.incarnation = secrets.token_hex(4)  # tells the broker this process is new (a restart)
        self._hello_ns = 0  # the signed timestamp of this process's last hello
        self.run_config = run_config(settings)  # claimed in READY and HELLO (shared/state/run_config.py)
        defense = {"clip_norm": settings.cut_clip_norm, "sigma": settings.cut_noise_sigma}
        if settings.cut_noise_seed is not None:
            defense["seed"] = settings.cut_noise_seed
        self.cut_defense = CutDefenseConfig(**defense)
        self._stopping = False
        self.metrics = RoleMetrics("silo", settings.silo_id, settings.metrics_port, settings.metrics_addr)
        self.codec = self._make_codec(settings)
        self.timeline = StepTimeline(self.codec, self.metrics)  # per-step parts, for `bench step`
        self.crypto_s = 0.0
        self.ctx = zmq.Context.instance()
        self.sock = client_socket(self.ctx, settings.silo_id, settings.broker_frontend, settings.curve, settings.curve_cert,
                                  settings.curve_broker_key)
        self.broker = BrokerLiveness(settings.heartbeat_s, settings.broker_timeout_s, settings.broker_frontend)
        self.aggregation = RoundAggregation(
            settings.silo_id, settings.run_id, trainable, self.dataset.num_examples,
            HandedKeys(settings.run_id, settings.operator_fingerprint),
            self.keys.x25519 if isinstance(self.codec, SealedCodec) else None, self.send, self.await_match)

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
        # The trunk accepts only hellos signed later than the last one it accepted: keep this
        # process's timestamps strictly increasing even if the wall clock steps back.
        self._hello_ns = max(time.time_ns(), self._hello_ns + 1)
        # The run config's digest is signed into the hello, so the trunk checks our settings itself.
        hello, pending = make_hello(self.keys, s.silo_id, s.run_id, rnd, cipher=s.cipher, now_ns=self._hello_ns,
                                    max_tensor_bytes=s.max_tensor_bytes, config_digest=config_digest(self.run_config))
        self.send(Message(Kind.HELLO, s.run_id, s.silo_id, rnd, step,
                           tensors=[torch.frombuffer(bytearray(hello), dtype=torch.uint8)],
                           text=claim_line(self.run_config)))
        for _ in range(3):
            ack = self.await_reply(Kind.HELLO_ACK, step)
            try:
                # Raises SealError("fingerprint_mismatch") unless the trunk holds the key pinned in our settings.
                session = pending.complete_ack(bytes(ack.tensors[0].numpy()), s.trunk_fingerprint)
                break
            except SealError as exc:
                if exc.reason != "bad_ack":
                    raise
                # An ack of an earlier hello of ours (e.g. replayed to a restarted trunk) can still be
                # in flight: it fails key confirmation. Wait for the one that answers this hello.
                log.warning("ignoring a HELLO_ACK that does not confirm this hello")
        else:
            raise PeerError("no HELLO_ACK confirmed this round's hello")
        self.codec.sessions.add(session)
        log.info("round %d: session established with trunk %s", rnd, s.trunk_fingerprint[:23])

    # ------------------------------------------------------------------ lifecycle
    def run(self, between_steps=None) -> int:
        """``between_steps(step)``: called after each step (`splitfed bench step` interleaves the
        centralized step there, so both are timed under the same machine load)."""
        s = self.settings
        signal.signal(signal.SIGTERM, self._on_sigterm)
        started = time.perf_counter()
        try:
            if s.checkpoint_dir is not None and not checkpoint.rounds_on_disk(self._checkpoints):
                self._save_checkpoint(-1)  # the state before step 0: where a rollback of round 0 returns
            step = self._resume(self._register())
            progress = _progress_bar(s.steps, s.silo_id)
            loss = float("nan")
            while step < s.steps:
                if self._stopping:
                    log.info("stopping after step %d on SIGTERM", step - 1)
                    break
                try:
                    loss = self.train_step(step)
                    if time.monotonic() - self._reported_at >= s.heartbeat_s:
                        self.report()
                    if (step + 1) % s.local_steps == 0 or step + 1 == s.steps:
                        self._end_round(step // s.local_steps)
                    if between_steps is not None:
                        between_steps(step)
                    step += 1
                except Rollback as exc:
                    # Say READY again: the broker ignores this silo's frames until then, so
                    # nothing sent before the rollback can mix into the replayed steps.
                    log.warning("rolling back to the end of round %d: %s", exc.round, exc)
                    self._register()
                    step = self._resume(exc.round)
                except Reregister as exc:
                    log.warning("registering again: %s", exc)
                    step = self._resume(self._register())
                if progress is not None:
                    progress.n = step
                    progress.set_postfix(round=step // s.local_steps, loss=f"{loss:.4f}", refresh=True)
            if progress is not None:
                progress.close()
            if s.generate is not None and not self._stopping:  # split generation through the trunk
                generate_live(self, round_no=(s.steps - 1) // s.local_steps)  # the last round's session
            self.report(status="finished")  # with the last step, which no report may have carried yet
            self.send(Message(Kind.DISCONNECT, s.run_id, s.silo_id))
        except BaseException:
            self.report(status="failed")
            raise
        finally:
            self.sock.close(linger=1000)  # the last report and DISCONNECT leave before we exit
        self._write_results(time.perf_counter() - started)
        return 0

    def _on_sigterm(self, *_: object) -> None:
        """First SIGTERM: finish the current step, then stop. Second: stop now."""
        if self._stopping:
            raise SystemExit(143)
        self._stopping = True

    # ------------------------------------------------------------------ rounds, checkpoints, recovery
    @property
    def _checkpoints(self) -> Path:
        return self.settings.checkpoint_dir / self.settings.silo_id

    def _end_round(self, rnd: int) -> None:
        """The round barrier (and FedAvg), then this silo's checkpoint of the round."""
        self.aggregation.run(rnd)
        if self.settings.checkpoint_dir is not None:
            self._save_checkpoint(rnd)
        self.send(Message(Kind.CHECKPOINTED, self.settings.run_id, self.settings.silo_id, rnd))

    def _save_checkpoint(self, rnd: int) -> None:
        tensors = {f"param/{i}": p for i, p in enumerate(self.trainable)}
        tensors.update(checkpoint.optimizer_tensors(self.optimizer))
        checkpoint.save(self._checkpoints, rnd, tensors, {"round": rnd, "history": self.history})

    def _resume(self, rnd: int) -> int:
        """Load the checkpoint of round ``rnd`` (-1: the initial state); return the next step."""
        s = self.settings
        first = (rnd + 1) * s.local_steps
        if rnd == -1 and not self.history:
            return 0  # nothing trained yet: the fresh state is the initial state
        if s.checkpoint_dir is None:
            raise PeerError(f"the run rolls back to round {rnd}, but this silo keeps no checkpoints "
                            "(start it with --checkpoint-dir)")
        loaded = checkpoint.load(self._checkpoints, rnd)
        if loaded is None:
            # Rounds went on without this silo (it was away): rejoin at the next round with the
            # newest weights it has; the next aggregation brings it up to date.
            older = [r for r in checkpoint.rounds_on_disk(self._checkpoints) if r < rnd]
            if not older:
                raise PeerError(f"no checkpoint of round {rnd} (or older) in {self._checkpoints}")
            log.warning("no checkpoint of round %d: rejoining with this silo's round %d weights", rnd, older[-1])
            loaded = checkpoint.load(self._checkpoints, older[-1])
        tensors, meta = loaded
        with torch.no_grad():
            for i, p in enumerate(self.trainable):
                p.copy_(tensors[f"param/{i}"])
        checkpoint.load_optimizer_tensors(self.optimizer, tensors)
        self._zero_grad()
        self.history = meta.get("history", [])
        log.info("resumed from the checkpoint of round %d: next step %d", rnd, first)
        return first

    def report(self, **fields) -> None:
        """PROGRESS to the broker, which records it in Redis: ``fields`` and the latest step, and the
        frames refused since the last report. Best effort: monitoring never stops training."""
        s = self.settings
        # within what the broker accepts of a report (shared/wire/control_text.py), or it refuses it whole
        rejected = {reason[:32]: min(n, 2**31 - 1) for reason, n in self.rejected.most_common(MAX_REJECTED_REASONS)}
        report = SiloReport({**self._progress_fields(), **fields}, rejected)
        try:
            self.send(Message(Kind.PROGRESS, s.run_id, s.silo_id, text=report.to_text()))
        except zmq.ZMQError as exc:
            log.warning("could not report progress to the broker: %s", exc)
            return
        self.rejected.clear()
        self._reported_at = time.monotonic()

    def _progress_fields(self) -> dict:
        """The latest step for `splitfed status` and the demo (empty before the first step)."""
        done = [h for h in self.history if not h.get("skipped")]
        if not self.settings.report_loss or not done:
            return {}
        last = done[-1]
        return {"round": last["round"], "step": last["step"], "loss": f"{last['loss']:.6f}",
                "updated_at": f"{time.time():.3f}"}

    def _register(self) -> int:
        """READY until accepted. After a restart the broker may still hold our old connection:
        it frees the id once that one has been silent for liveness_ttl_s, so retry with back-off."""
        s = self.settings
        delay, deadline = 0.25, time.monotonic() + 3 * s.liveness_ttl_s
        while True:
            token = []
            if isinstance(self.codec, SealedCodec):  # prove we hold the enrolled identity
                raw = sign_registration(self.keys, s.run_id, s.silo_id)
                token = [torch.frombuffer(bytearray(raw), dtype=torch.uint8)]
            self.send(Message(Kind.READY, s.run_id, s.silo_id, tensors=token,
                               text=PeerIntro(self.incarnation, claim_line(self.run_config)).to_text()))
            try:
                ack = self.await_reply(Kind.READY, step=0)
                break
            except (Reregister, Rollback) as exc:
                # Replies to what we sent before this READY (e.g. heartbeats to a restarted broker):
                # the READY's own answer says where to resume. Say READY again, at most twice a second.
                log.info("while registering: %s", exc)
                time.sleep(0.5)
            except IdentityTaken:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("the broker still holds %s's previous connection; retrying in %.2fs", s.silo_id, delay)
                time.sleep(delay)
                delay *= 2
        log.info("silo %s registered with the broker (%d examples)", s.silo_id, self.dataset.num_examples)
        self.report(samples=len(self.dataset), steps=s.steps, pid=os.getpid(), host=socket.gethostname()[:128])
        return resume_round(ack.text)

    # ------------------------------------------------------------------ one training step
    def train_step(self, step: int) -> float:
        s = self.settings
        started = time.perf_counter()
        self.timeline.step_started()
        rnd = step // s.local_steps
        if isinstance(self.codec, SealedCodec) and step % s.local_steps == 0:
            self._handshake(rnd, step)
        batch = self.dataset.batch(step)
        if s.micro_batches > 1:
            return self._record_step(step, rnd, *run_microbatched_step(self, step, rnd, batch), started)
        mask = batch.attention_mask
        positions = positions_from_mask(mask)

        h1 = self.head(batch.input_ids, mask, positions)
        if self.cut_defense.enabled:  # blur what the trunk operator could invert, before sealing
            h1 = protect_cut_with(self.cut_defense, h1, mask, s.silo_index, rnd, step)
        forward = Message(Kind.FORWARD, s.run_id, s.silo_id, rnd, step, tensors=[
            h1.detach().to(self.wire_dtype), mask.to(torch.uint8), positions.to(torch.int32)])
        for attempt in range(1, MAX_STEP_ATTEMPTS + 1):
            self.send(forward)
            try:
                return self._finish_step(step, rnd, batch, h1, mask, positions, started)
            except Straggler as exc:
                # Client-batch: the trunk batch of this step went on without us. Rejoin at the next step.
                log.warning("step %d skipped: %s", step, exc, extra={"silo": s.silo_id, "step": step, "reason": "straggler"})
                self._zero_grad()
                self.history.append({"round": rnd, "step": step, "loss": None, "skipped": True})
                return float("nan")
            except Retry as exc:
                # The trunk worker holding this step died before applying it: send the step again
                # (the head's graph is intact; the tail's gradients of the lost try are dropped).
                log.warning("step %d, try %d: %s", step, attempt, exc)
                self._zero_grad()
        raise PeerError(f"step {step} failed {MAX_STEP_ATTEMPTS} times: trunk workers keep dying")

    def _zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def _finish_step(self, step, rnd, batch, h1, mask, positions, started) -> float:
        s = self.settings
        reply = self.await_reply(Kind.FORWARD_RESULT, step)

        h2 = reply.tensors[0].to(h1.dtype).requires_grad_(True)
        logits = self.tail(h2, mask, positions)
        loss = causal_lm_loss(logits, batch.labels)
        loss.backward()  # grads of the tail (and tied LM head) and dL/dh2

        self.send(Message(Kind.BACKWARD, s.run_id, s.silo_id, rnd, step, tensors=[h2.grad.to(self.wire_dtype)]))
        reply = self.await_reply(Kind.BACKWARD_RESULT, step)

        h1.backward(reply.tensors[0].to(h1.dtype))  # grads of the head
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return self._record_step(step, rnd, float(loss.detach()), int(reply.tensors[1][0]), started)

    def _record_step(self, step: int, rnd: int, value: float, trunk_seq: int, started: float) -> float:
        s = self.settings
        self.history.append({"round": rnd, "step": step, "loss": value, "trunk_seq": trunk_seq,
                             "t": round(time.time(), 4)})
        self.timeline.step_done(step)
        self.metrics.step(time.perf_counter() - started)
        # On a terminal the progress bar shows each step; a log line would tear it.
        log.log(logging.DEBUG if sys.stderr.isatty() else logging.INFO, "round %d step %d loss %.4f", rnd, step, value,
                extra={"silo": s.silo_id, "round": rnd, "step": step, "loss": value})
        return value

    # ------------------------------------------------------------------ messaging
    def send(self, msg: Message) -> None:
        frames = self.codec.encode(msg)
        with self.timeline.io():
            self.sock.send_multipart(frames, copy=False)
        self.metrics.sent(frames)

    def await_reply(self, kind: Kind, step: int) -> Message:
        """Wait for ``kind`` of ``step``; stale or malformed replies are dropped, ERROR raises."""
        return self.await_match(lambda m: m.kind == kind and (kind == Kind.READY or m.step == step),
                                 f"{kind.name} for step {step}", step)

    def await_match(self, wanted, what: str, step: int | None = None) -> Message:
        s = self.settings
        deadline = time.monotonic() + s.step_timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise PeerError(f"no {what} within {s.step_timeout_s:.0f}s "
                                f"(is the broker at {s.broker_frontend} up, with a trunk worker?)")
            waited = time.monotonic()
            with self.timeline.io():
                ready = self.sock.poll(min(left_ms, int(self.broker.interval_s * 1000)))
            if not ready:
                self.broker.silent_for(time.monotonic() - waited)  # raises PeerError past broker_timeout_s
                # Waiting for our turn: tell the broker this connection is alive.
                self.send(Message(Kind.HEARTBEAT, s.run_id, s.silo_id))
                continue
            with self.timeline.io():
                frames = self.sock.recv_multipart(copy=False)
            self.broker.heard()
            self.metrics.received(frames)
            try:
                msg = self.codec.decode([f.buffer for f in frames])
            except FrameError as exc:
                self.rejected[exc.reason] += 1
                self.metrics.rejected(exc.reason)
                log.warning("rejected frame from the broker: %s", exc)
                continue
            if msg.kind == Kind.HEARTBEAT:  # the broker's: it is alive
                continue
            if msg.kind == Kind.ROLLBACK:
                raise Rollback(msg.text)
            if msg.kind == Kind.ERROR:
                error = ErrorReason.from_text(msg.text)
                if error.code == Reason.CONFIG_MISMATCH:  # the broker or the trunk: our settings differ
                    raise ConfigMismatch(f"config mismatch with the run: {error.detail}")
                if error.code == Reason.REGISTER:
                    raise Reregister(msg.text)
                if error.code == Reason.IDENTITY_TAKEN:
                    raise IdentityTaken(f"step {msg.step} refused: {msg.text}")
                if error.code == Reason.STRAGGLER and msg.step == step:
                    raise Straggler(msg.text)
                if error.code == Reason.RETRY and step is not None:
                    raise Retry(msg.text)
                raise PeerError(f"step {msg.step} refused: {msg.text}")
            if wanted(msg):
                return msg
            log.warning("dropped unexpected %s (round %d step %d) while waiting for %s", msg.kind.name, msg.round, msg.step, what)

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
                   "encryption": isinstance(self.codec, SealedCodec), "crypto_s": crypto_s,
                   "timeline": list(self.timeline.rows)}
            _atomic(s.results, lambda p: p.write_text(json.dumps(doc, indent=1)))


def _progress_bar(total: int, silo_id: str):
    """A tqdm bar when a person watches (stderr is a terminal); log lines otherwise."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=silo_id, unit="step", dynamic_ncols=True)


def _atomic(path: Path, write) -> None:
    """Write to a temporary name, fsync and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write(tmp)
