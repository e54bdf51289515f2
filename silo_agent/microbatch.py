"""One silo step as N micro-batches, overlapped with the trunk (serial mode, ``--micro-batches N``).

    for each micro-batch i:   head(i) -> FORWARD(i)           the trunk starts i as soon as it lands,
                                                              while we compute head(i+1)
    for each micro-batch i:   FORWARD_RESULT(i) -> tail, loss_i * w_i, backward -> BACKWARD(i)
    for each micro-batch i:   BACKWARD_RESULT(i) -> head backward
    one optimizer step (the gradients of all micro-batches accumulated)

All FORWARDs of a step carry the step's number and leave before any of its BACKWARDs; BACKWARDs go
in the same order. The trunk and the broker rely on that order: the k-th BACKWARD of a step is
the k-th FORWARD's, and the trunk steps its optimizer when the step's last open graph is done
(trunk_worker/pending_graphs.py); the broker keeps the silo's serial turn until then.
Replies of the two kinds can interleave on the socket (the trunk answers in arrival order), so
they are filed by kind, each kind first in first out.

The weights w_i (shared/model/microbatch.py) make the accumulated gradients those of the whole batch.
A micro-batched step is not retried when its trunk worker is lost (a retry would have to resend
every micro-batch): that ends the run with PeerError.
"""

from __future__ import annotations

from collections import deque

import torch

from shared.model.loss import causal_lm_loss
from shared.model.microbatch import split_batch
from shared.model.model_split import positions_from_mask
from shared.wire.protocol import Kind
from shared.wire.wire import Message
from silo_agent.peer_errors import PeerError, Retry, Straggler


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


def run_microbatched_step(agent, step: int, rnd: int, batch) -> tuple[float, int]:
    """Returns (the step's loss, the trunk's update counter after it)."""
    s = agent.settings
    if agent.cut_defense.enabled:
        # One noise draw per (round, step) would repeat across the step's micro-batches.
        raise PeerError("the cut defense does not support --micro-batches > 1 yet")
    inflight = []
    for mb, weight in split_batch(batch, s.micro_batches):
        mask = mb.attention_mask
        positions = positions_from_mask(mask)
        h1 = agent.head(mb.input_ids, mask, positions)
        agent.send(Message(Kind.FORWARD, s.run_id, s.silo_id, rnd, step, tensors=[
            h1.detach().to(agent.wire_dtype), mask.to(torch.uint8), positions.to(torch.int32)]))
        inflight.append((mb, weight, h1, mask, positions))
    inbox = _Inbox(agent, step)
    try:
        total = 0.0
        for mb, weight, h1, mask, positions in inflight:
            h2 = inbox.next(Kind.FORWARD_RESULT).tensors[0].to(h1.dtype).requires_grad_(True)
            loss = causal_lm_loss(agent.tail(h2, mask, positions), mb.labels) * weight
            loss.backward()  # accumulates into the tail's grads
            agent.send(Message(Kind.BACKWARD, s.run_id, s.silo_id, rnd, step,
                                tensors=[h2.grad.to(agent.wire_dtype)]))
            total += float(loss.detach())
        for _, _, h1, _, _ in inflight:
            reply = inbox.next(Kind.BACKWARD_RESULT)
            h1.backward(reply.tensors[0].to(h1.dtype))
    except (Retry, Straggler) as exc:
        raise PeerError(f"micro-batched step {step} cannot be retried: {exc}") from exc
    if agent.optimizer is not None:
        agent.optimizer.step()
        agent.optimizer.zero_grad(set_to_none=True)
    return total, int(reply.tensors[1][0])
