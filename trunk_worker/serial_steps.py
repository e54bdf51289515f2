"""The trunk's step runner for serial mode, and what the other modes' runners build on.

A runner is what a training mode IS on the trunk: how a FORWARD and its BACKWARD become an update,
what happens at a round's end, and what a checkpoint holds. The worker (trunk_worker/worker.py)
owns the socket, the sessions and recovery, and hands every step message to its runner:

* ``SerialSteps``        -- one silo's step at a time through the one trunk, one optimizer step per
                            step (micro-batches accumulate until the step's last one);
* ``ClientBatchSteps``   -- several silos' steps as one trunk batch (trunk_worker/client_batch_steps.py);
* ``HierarchicalSteps``  -- a trunk adapter and optimizer per silo over the shared frozen base,
                            averaged across workers at each round's end (trunk_worker/hierarchical_steps.py).

For each FORWARD the runner keeps the autograd graph (input h1 and output h2) until that step's
BACKWARD arrives, then back-propagates dL/dh2, steps the optimizer and returns dL/dh1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from shared.model.adapter_files import save_adapter_file
from shared.model.adapters import adapter_state_dict
from shared.runtime.metrics import RoleMetrics
from shared.model.optim import make_optimizer
from shared.runtime.settings import TrunkSettings
from shared.runtime.step_timeline import StepTimeline
from shared.wire.protocol import Kind
from shared.wire.wire import Message
from trunk_worker.checkpointing import load_trunk, save_trunk
from trunk_worker.pending_graphs import PendingGraphs
from trunk_worker.step_error import StepError

log = logging.getLogger("trunk")


def step_counters(updates: int, busy_s: float) -> torch.Tensor:
    """A BACKWARD_RESULT's second tensor: the update counter, and this piece's trunk compute time in
    microseconds (a silo sizes its micro-batches by it: silo_agent/microbatch_depth.py)."""
    return torch.tensor([updates, round(busy_s * 1e6)], dtype=torch.int64)


@dataclass
class TrunkModel:
    trunk: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    device: torch.device  # where its inputs go
    compute_dtype: torch.dtype  # the base's (adapters are fp32 masters)
    wire_dtype: torch.dtype  # what results travel as

    @property
    def hidden_size(self) -> int:
        return self.trunk.config.hidden_size


@dataclass
class RunnerContext:
    settings: TrunkSettings
    send: Callable[[Message], None]
    close_round: Callable[[int], None]  # checkpoint round n and tell the broker (ROUND_DONE)
    timeline: StepTimeline
    metrics: RoleMetrics


class SerialSteps:
    def __init__(self, model: TrunkModel, ctx: RunnerContext) -> None:
        self.model = model
        self.ctx = ctx
        self.settings = ctx.settings
        self.optimizer = self._make_optimizer()
        self.pending = PendingGraphs(self.settings.max_pending)
        self.updates = 0
        self.recomputed_steps = 0  # forwards kept as inputs only (--recompute-forward)
        # Each silo's last applied step with its BACKWARD_RESULT and FORWARD_RESULT, for a retried
        # step: a silo sends step n+1 only after step n's result, so the last one is the only one
        # that can come again. Its FORWARD gets the kept output (running it again through the updated
        # trunk would hand the silo another h2 than the one the kept dL/dh1 belongs to).
        self.applied: dict[str, tuple[int, Message, Message | None]] = {}
        self.forwarded: dict[str, tuple[int, int, Message]] = {}  # silo -> (step, FORWARDs of it, last output)

    def _make_optimizer(self) -> torch.optim.Optimizer | None:
        return make_optimizer(self.model.trainable, self.settings.lr, self.settings.weight_decay)

    # ------------------------------------------------------------------ what a mode changes
    def _activate(self, silo: str) -> None:
        """Before a silo's forward: the one trunk serves every silo alike."""

    def _before_backward(self, silo: str) -> None:
        """Before a silo's backward (the one trunk: nothing to swap in)."""

    def _optimizer_for(self, silo: str) -> torch.optim.Optimizer | None:
        return self.optimizer

    @property
    def trainable_tensors(self) -> int:
        return 0 if self.optimizer is None else len(self.optimizer.param_groups[0]["params"])

    # ------------------------------------------------------------------ the two halves of a step
    def forward(self, msg: Message) -> None:
        self.ctx.send(self._forward(msg))

    def _forward(self, msg: Message) -> Message:
        last_applied = self.applied.get(msg.silo_id)
        if last_applied is not None and last_applied[0] == msg.step and last_applied[2] is not None:
            log.warning("%s step %d already applied: answering its FORWARD again with the kept output", msg.silo_id,
                        msg.step)
            return last_applied[2]
        hidden, mask, positions = msg.tensors
        if hidden.shape[-1] != self.model.hidden_size:
            raise StepError("schema", f"hidden size {hidden.shape[-1]}, trunk expects {self.model.hidden_size}")
        started = time.perf_counter()
        self._activate(msg.silo_id)
        device = self.model.device
        h1 = hidden.to(device, self.model.compute_dtype).requires_grad_(True)
        inputs = (h1, mask.to(device, torch.long), positions.to(device, torch.long))
        with torch.enable_grad():
            if self.settings.recompute_forward:
                # Keep only the inputs; the forward runs again inside this step's backward (torch's
                # activation checkpointing; the same kernels give the same h2, bit for bit). Backwards
                # run one at a time, so one step's activations exist at a time, however many are open.
                h2 = torch_checkpoint(self.model.trunk, *inputs, use_reentrant=False)
                self.recomputed_steps += 1
            else:
                h2 = self.model.trunk(*inputs)
        for old in self.pending.add((msg.silo_id, msg.step), (h1, h2, time.perf_counter() - started)):
            log.warning("dropped the graph of %s step %d: more than %d pending", old[0], old[1], self.settings.max_pending)
        result = Message(Kind.FORWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                         tensors=[h2.detach().to(self.model.wire_dtype)])
        previous = self.forwarded.get(msg.silo_id)
        count = previous[1] + 1 if previous is not None and previous[0] == msg.step else 1
        self.forwarded[msg.silo_id] = (msg.step, count, result)
        return result

    def backward(self, msg: Message) -> None:
        self.ctx.send(self._backward(msg))

    def _backward(self, msg: Message) -> Message:
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
        self._before_backward(msg.silo_id)
        h2.backward(grad.to(self.model.device, h2.dtype))
        wire = self.model.wire_dtype
        if not last:  # a micro-batch: its gradients accumulate until the step's last one
            return Message(Kind.BACKWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                           tensors=[h1.grad.to(wire), step_counters(self.updates, forward_s + time.perf_counter() - started)])
        optimizer = self._optimizer_for(msg.silo_id)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.ctx.timeline.step_done_after_busy(msg.step)
        busy_s = forward_s + time.perf_counter() - started
        self.ctx.metrics.step(busy_s)
        applied = step_counters(self.updates, busy_s)
        result = Message(Kind.BACKWARD_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                         tensors=[h1.grad.to(wire), applied])
        forwarded = self.forwarded.pop(msg.silo_id, None)
        # A step of micro-batches had several outputs: a retry of it gets no kept output (it runs again).
        kept = forwarded[2] if forwarded is not None and forwarded[:2] == (msg.step, 1) else None
        self.applied[msg.silo_id] = (msg.step, result, kept)
        return result

    def bundle(self, members: list[Message]) -> None:
        raise StepError("unexpected_kind", "BUNDLE outside client-batch mode")

    def poll(self) -> None:
        """Between messages: work that is due by time (client-batch: stragglers' deadlines)."""

    # ------------------------------------------------------------------ rounds
    def round_end(self, msg: Message) -> None:
        """Every round step is applied: checkpoint the round (the trunk is averaged only in hierarchical mode)."""
        self._forget_kept_results()
        if msg.text:
            raise StepError("unexpected_kind", "trunk averaging outside hierarchical mode")
        self.ctx.close_round(msg.round)

    def _forget_kept_results(self) -> None:
        # Every silo of the round has its last result (it joined the round's end after it): no retry
        # can come, and the worker is at its fullest now, so drop the kept results before averaging.
        self.applied.clear()
        self.forwarded.clear()

    def trunk_sync(self, msg: Message) -> None:
        raise StepError("unexpected_kind", "TRUNK_SYNC outside hierarchical mode")

    def before_generation(self, msg: Message) -> None:
        """A GENERATE or GENERATE_END is about to run through the trunk as it is."""

    # ------------------------------------------------------------------ state on disk
    def clear(self) -> None:
        """Drop every open step and kept result (a rollback to a committed round)."""
        self.pending.clear()
        self.applied.clear()
        self.forwarded.clear()

    def save_checkpoint(self, directory: Path, rnd: int) -> None:
        save_trunk(directory, rnd, self.model.trainable, self.optimizer, None, self.updates)

    def load_checkpoint(self, directory: Path, rnd: int) -> int | None:
        return load_trunk(directory, rnd, self.model.trainable, self.optimizer, None)

    def save_adapters(self, directory: Path, meta: dict) -> None:
        """The trunk's adapter for `splitfed eval` / `splitfed export`: trunk.safetensors."""
        save_adapter_file(directory / "trunk.safetensors", adapter_state_dict(self.model.trunk), meta)
