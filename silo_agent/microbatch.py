"""One silo step as N micro-batches, overlapped with the trunk (``--micro-batches N|auto``).

    for each micro-batch i:   head(i) -> FORWARD(i)           the trunk starts i as soon as it lands,
                                                              while we compute head(i+1)
    for each micro-batch i:   FORWARD_RESULT(i) -> tail, loss_i * w_i, backward -> BACKWARD(i)
    for each micro-batch i:   BACKWARD_RESULT(i) -> head backward
    one optimizer step (the gradients of all micro-batches accumulated)

All FORWARDs of a step carry the step's number and leave before any of its BACKWARDs, every one but
the last flagged "more"; BACKWARDs go in the same order. The trunk and the broker rely on that order:
the k-th BACKWARD of a step is the k-th FORWARD's. In serial mode the trunk steps its optimizer when
the step's last open graph is done (trunk_worker/pending_graphs.py) and the broker keeps the silo's
turn until then. In client-batch mode the broker puts every silo's k-th piece into the step's k-th
trunk batch (broker/batch_window.py) and the trunk adds the batches up into one update
(trunk_worker/step_groups.py).
Replies of the two kinds can interleave on the socket (the trunk answers in arrival order), so
they are filed by kind, each kind first in first out.

The weights w_i (shared/model/microbatch.py) make the accumulated gradients those of the whole batch.
A micro-batched step is not retried when its trunk worker is lost (a retry would have to resend
every micro-batch): that ends the run with PeerError. A client-batch straggler skips the step, as
without micro-batches.

``--micro-batches auto`` runs depth 1 through this same path while it measures the round trip and
the trunk's time, then keeps the depth that covers one round trip (silo_agent/microbatch_depth.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from shared.model.loss import causal_lm_loss
from shared.model.microbatch import split_batch
from shared.model.model_split import positions_from_mask
from shared.wire.protocol import Kind
from shared.wire.wire import Message
from silo_agent.microbatch_depth import DepthProbe
from silo_agent.peer_errors import PeerError, Retry, Straggler

log = logging.getLogger("silo")


class _Inbox:
    """This step's replies by kind, in arrival order (FIFO per kind)."""

    def __init__(self, agent, step: int) -> None:
        self.agent, self.step = agent, step
        self.queues = {Kind.FORWARD_RESULT: deque(), Kind.BACKWARD_RESULT: deque()}

    def next(self, kind: Kind) -> Message:
        while not self.queues[kind]:
            msg = self.agent.await_match(lambda m: m.kind in self.queues and m.step == self.step,
                                          f"results of step {self.step}", self.step)
            self.queues[msg.kind].append(msg)
        return self.queues[kind].popleft()


class MicroBatchedSteps:
    """The silo's steps cut into pieces; the depth fixed or measured (``auto``)."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.probe = DepthProbe(agent.settings.micro_batches, agent.settings.batch_size)

    def train_step(self, step: int, rnd: int, batch, started: float) -> float:
        agent = self.agent
        depth = self.probe.depth
        began = time.perf_counter()  # after the round's handshake, which is no part of the comparison
        try:
            loss, counters, waits = run_microbatched_step(agent, step, rnd, batch, depth)
        except Straggler as exc:  # client-batch: this step's trunk batch went on without us
            log.warning("step %d skipped: %s", step, exc,
                        extra={"silo": agent.settings.silo_id, "step": step, "reason": "straggler"})
            agent._zero_grad()
            agent.history.append({"round": rnd, "step": step, "loss": None, "skipped": True})
            return float("nan")
        self.probe.observe(depth, time.perf_counter() - began, waits, counters[1] / 1e6 if len(counters) > 1 else None)
        value = agent._record_step(step, rnd, loss, int(counters[0]), started)
        agent.history[-1]["micro_batches"] = min(depth, batch.input_ids.shape[0])
        return value


def run_microbatched_step(agent, step: int, rnd: int, batch, depth: int):
    """Returns (the step's loss, the last BACKWARD_RESULT's counters, and at depth 1 the two waits
    (forward result, backward result) in seconds, else None)."""
    s = agent.settings
    if agent.cut_defense.enabled:
        # One noise draw per (round, step) would repeat across the step's micro-batches.
        raise PeerError("the cut defense does not support --micro-batches other than 1 yet")
    inflight = []
    pieces = split_batch(batch, min(depth, batch.input_ids.shape[0]))
    for i, (mb, weight) in enumerate(pieces):
        mask = mb.attention_mask
        positions = positions_from_mask(mask)
        h1 = agent.head(mb.input_ids, mask, positions)
        agent.send(Message(Kind.FORWARD, s.run_id, s.silo_id, rnd, step, tensors=[
            h1.detach().to(agent.wire_dtype), mask.to(torch.uint8), positions.to(torch.int32)],
            more=i < len(pieces) - 1))
        inflight.append((mb, weight, h1, mask, positions))
    sent_forward = time.perf_counter()
    inbox = _Inbox(agent, step)
    try:
        total = 0.0
        for mb, weight, h1, mask, positions in inflight:
            h2 = inbox.next(Kind.FORWARD_RESULT).tensors[0].to(h1.dtype).requires_grad_(True)
            forward_wait = time.perf_counter() - sent_forward
            loss = causal_lm_loss(agent.tail(h2, mask, positions), mb.labels) * weight
            loss.backward()  # accumulates into the tail's grads
            agent.send(Message(Kind.BACKWARD, s.run_id, s.silo_id, rnd, step,
                                tensors=[h2.grad.to(agent.wire_dtype)]))
            sent_backward = time.perf_counter()
            total += float(loss.detach())
        for _, _, h1, _, _ in inflight:
            reply = inbox.next(Kind.BACKWARD_RESULT)
            backward_wait = time.perf_counter() - sent_backward
            h1.backward(reply.tensors[0].to(h1.dtype))
    except Retry as exc:
        raise PeerError(f"micro-batched step {step} cannot be retried: {exc}") from exc
    if agent.optimizer is not None:
        agent.optimizer.step()
        agent.optimizer.zero_grad(set_to_none=True)
    waits = (forward_wait, backward_wait) if len(pieces) == 1 else None
    return total, reply.tensors[1].tolist(), waits
