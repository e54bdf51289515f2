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

import logging
import secrets
import signal
import sys
import time
from pathlib import Path

import torch

from shared.crypto import keys as keystore
from shared.crypto.peer_keys import HandedKeys
from shared.crypto.sealed_codec import SealedCodec
from shared.data.dataset import SiloDataset, load_jsonl
from shared.data.tokenizer import load_tokenizer
from shared.model.adapters import apply_adapter, unique_parameters
from shared.model.cut_defense import CutDefenseConfig, protect_cut_with
from shared.model.loss import causal_lm_loss
from shared.model.part_loading import build_silo_parts
from shared.model.model_split import positions_from_mask
from shared.model.optim import make_optimizer
from shared.runtime.metrics import RoleMetrics
from shared.runtime.settings import SiloSettings
from shared.runtime.step_timeline import StepTimeline
from shared.state import checkpoint
from shared.state.run_config import run_config
from shared.wire.broker_liveness import BrokerLiveness
from shared.wire.codec import PlainCodec
from shared.wire.peer_link import BrokerLink
from shared.wire.protocol import WIRE_DTYPE_BY_NAME, Kind
from shared.wire.wire import Message
from silo_agent.aggregation import RoundAggregation
from silo_agent.generation import generate_live
from silo_agent.microbatch import MicroBatchedSteps
from silo_agent.peer_errors import PeerError, Reregister, Retry, Rollback, Straggler
from silo_agent.privacy_defense import SiloPrivacyDefense, privacy_config
from silo_agent.registration import SiloRegistration
from silo_agent.replies import SiloReplies
from silo_agent.round_state import SiloRounds

log = logging.getLogger("silo")

MAX_STEP_ATTEMPTS = 3


class SiloAgent(SiloRegistration, SiloRounds):
    """One silo: its training loop and step here; registration and reports in
    silo_agent/registration.py, round checkpoints and results in silo_agent/round_state.py, what it
    waits for in silo_agent/replies.py, the connection itself in shared/wire/peer_link.py."""

    def __init__(self, settings: SiloSettings, model_dir: Path) -> None:
        if settings.data is None:
            raise ValueError("a silo needs training data: --data FILE.jsonl (or SPLITFED_DATA)")
        self.settings = settings
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
        self.micro = MicroBatchedSteps(self)  # --micro-batches N|auto (silo_agent/microbatch.py)
        self.incarnation = secrets.token_hex(4)  # tells the broker this process is new (a restart)
        self._hello_ns = 0  # the signed timestamp of this process's last hello
        self.run_config = run_config(settings)  # claimed in READY and HELLO (shared/state/run_config.py)
        defense = {"clip_norm": settings.cut_clip_norm, "sigma": settings.cut_noise_sigma}
        if settings.cut_noise_seed is not None:
            defense["seed"] = settings.cut_noise_seed
        self.cut_defense = CutDefenseConfig(**defense)
        privacy = privacy_config(settings)  # the learned defense (silo_agent/privacy_defense.py); None: off
        self.privacy = None if privacy is None else SiloPrivacyDefense(
            privacy, self.cut_defense, self.head, self.dataset, settings.silo_index, settings.seed)
        self._stopping = False
        self.metrics = RoleMetrics("silo", settings.silo_id, settings.metrics_port, settings.metrics_addr)
        self.codec = self._make_codec(settings)
        self.timeline = StepTimeline(self.codec, self.metrics)  # per-step parts, for `bench step`
        self.crypto_s = 0.0
        liveness = BrokerLiveness(settings.heartbeat_s, settings.broker_timeout_s, settings.broker_frontend,
                                  give_up=PeerError)
        self.link = BrokerLink(settings.silo_id, settings.run_id, settings.broker_frontend, self.codec, self.metrics,
                               self.timeline, liveness, settings.curve, settings.curve_cert, settings.curve_broker_key)
        replies = SiloReplies(self.link, settings)
        self.await_reply, self.await_match = replies.await_reply, replies.await_match
        self.aggregation = RoundAggregation(
            settings.silo_id, settings.run_id, trainable, self.dataset.num_examples,
            HandedKeys(settings.run_id, settings.operator_fingerprint),
            self.keys.x25519 if isinstance(self.codec, SealedCodec) else None, self.send, self.await_match)

    def _make_codec(self, settings: SiloSettings):
        if not settings.encryption:
            log.warning("encryption is OFF: this silo's activations cross the network in the clear")
            return PlainCodec(settings.max_tensor_bytes, settings.wire_dtype, settings.wire_chunk_bytes)
        if settings.keys_dir is None:
            raise ValueError("encryption is on: pass --keys-dir with this silo's keys "
                             "(`splitfed keys gen --role silo --out DIR`, then enroll them)")
        if not settings.trunk_fingerprint:
            raise ValueError("encryption is on: pin the trunk service key with --trunk-fingerprint sha256:... "
                             "(the operator's `splitfed keys fingerprint DIR` prints it)")
        self.keys = keystore.load_silo_keys(settings.keys_dir)
        return SealedCodec(settings.max_tensor_bytes, settings.wire_dtype, settings.wire_chunk_bytes)

    # ------------------------------------------------------------------ lifecycle
    def run(self, between_steps=None) -> int:
        """``between_steps(step)``: called after each step (`splitfed bench step` interleaves the
        centralized step there, so both are timed under the same machine load)."""
        s = self.settings
        signal.signal(signal.SIGTERM, self._on_sigterm)
        started = time.perf_counter()
        try:
            if self.privacy is not None and not (s.checkpoint_dir and checkpoint.rounds_on_disk(self._checkpoints)):
                self.privacy.warm_up()  # once, before the state a rollback of round 0 returns to
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
            self.link.close(linger_ms=1000)  # the last report and DISCONNECT leave before we exit
        self._write_results(time.perf_counter() - started)
        return 0

    def _on_sigterm(self, *_: object) -> None:
        """First SIGTERM: finish the current step, then stop. Second: stop now."""
        if self._stopping:
            raise SystemExit(143)
        self._stopping = True

    # ------------------------------------------------------------------ one training step
    def train_step(self, step: int) -> float:
        s = self.settings
        started = time.perf_counter()
        self.timeline.step_started()
        rnd = step // s.local_steps
        if isinstance(self.codec, SealedCodec) and step % s.local_steps == 0:
            self._handshake(rnd, step)
        batch = self.dataset.batch(step)
        if s.micro_batches != 1:
            return self.micro.train_step(step, rnd, batch, started)
        mask = batch.attention_mask
        positions = positions_from_mask(mask)

        h1 = self.head(batch.input_ids, mask, positions)
        if self.privacy is not None:  # the learned adapter, then the cut defense's clipping and noise
            h1 = self.privacy.defend(h1, batch.input_ids, mask, rnd, step)
        elif self.cut_defense.enabled:  # blur what the trunk operator could invert, before sealing
            h1 = protect_cut_with(self.cut_defense, h1, mask, s.silo_index, rnd, step)
        forward = Message(Kind.FORWARD, s.run_id, s.silo_id, rnd, step, tensors=[
            h1.detach().to(self.wire_dtype), mask.to(torch.uint8), positions.to(torch.int32)])
        for attempt in range(1, MAX_STEP_ATTEMPTS + 1):
            self.send(forward)
            if self.privacy is not None:
                self.privacy.train_inverter()  # the silo's own inverter learns while the trunk works
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

        if self.privacy is not None:  # dL/dh1 plus the adversarial term's gradient; the adapter's own step
            self.privacy.backward(h1, reply.tensors[0].to(h1.dtype))
        else:
            h1.backward(reply.tensors[0].to(h1.dtype))  # grads of the head
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return self._record_step(step, rnd, float(loss.detach()), int(reply.tensors[1][0]), started)

    def _record_step(self, step: int, rnd: int, value: float, trunk_seq: int, started: float) -> float:
        s = self.settings
        self.history.append({"round": rnd, "step": step, "loss": value, "trunk_seq": trunk_seq,
                             "t": round(time.time(), 4), **(self.privacy.step_record() if self.privacy else {})})
        self.timeline.step_done(step)
        self.metrics.step(time.perf_counter() - started)
        # On a terminal the progress bar shows each step; a log line would tear it.
        log.log(logging.DEBUG if sys.stderr.isatty() else logging.INFO, "round %d step %d loss %.4f", rnd, step, value,
                extra={"silo": s.silo_id, "round": rnd, "step": step, "loss": value})
        return value

    # ------------------------------------------------------------------ messaging (silo_agent/replies.py)
    def send(self, msg: Message) -> None:
        self.link.send(msg)

    @property
    def sock(self):
        return self.link.sock


def _progress_bar(total: int, silo_id: str):
    """A tqdm bar when a person watches (stderr is a terminal); log lines otherwise."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=silo_id, unit="step", dynamic_ncols=True)

