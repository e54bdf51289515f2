"""The trunk's step runner for client-batch mode: one trunk batch from several silos' steps.

The broker bundles one step's FORWARDs from up to M silos (BUNDLE); the worker opens each member
with its own silo's session and hands them here. One forward runs over the concatenated batch
(trunk_worker/batch_step.py); each silo gets its slice of the output. When every member's gradient
is in, or when the straggler timeout passes, one backward and one optimizer step follow; a silo
that sent no gradient in time is told (ERROR "straggler") and its slice counts as zero.

With micro-batches a step arrives as several bundles, one per piece; their gradients add up into
one update (trunk_worker/step_groups.py). A bundle with no piece flagged "more", of a step with no
pieces open, is a step of its own, as without micro-batches.
"""

from __future__ import annotations

import logging
import time

import torch

from shared.wire.protocol import ErrorReason, Kind, Reason
from shared.wire.wire import Message
from trunk_worker.batch_step import BatchSteps, OpenBundle
from trunk_worker.serial_steps import RunnerContext, SerialSteps, TrunkModel, step_counters
from trunk_worker.step_error import StepError
from trunk_worker.step_groups import InOrderReplies, StepGroup

log = logging.getLogger("trunk")


class ClientBatchSteps(SerialSteps):
    def __init__(self, model: TrunkModel, ctx: RunnerContext) -> None:
        super().__init__(model, ctx)
        self.batches = BatchSteps(model.trunk, model.device, model.compute_dtype, ctx.settings.straggler_timeout_s)
        self.groups: dict[int, StepGroup] = {}  # step -> its pieces' update, while micro-batches are open
        self.group_of: dict[int, StepGroup] = {}  # id(bundle) -> its step's group
        self.replies = InOrderReplies()

    def bundle(self, members: list[Message]) -> None:
        bundle, outputs = self.batches.forward(members)
        step = members[0].step
        if step in self.groups or any(m.more for m in members):
            group = self.groups.setdefault(step, StepGroup(step, bundle.deadline))
            group.add_batch(members, bundle.deadline)
            self.group_of[id(bundle)] = group
        for m, out in zip(members, outputs):
            self.replies.expect(m.silo_id, m.step, id(bundle))
            self.ctx.send(Message(Kind.FORWARD_RESULT, m.run_id, m.silo_id, m.round, m.step,
                                  tensors=[out.to(self.model.wire_dtype)]))

    def backward(self, msg: Message) -> None:
        if not self.batches.shape_ok(msg):
            raise StepError("no_open_step", f"no trunk batch open for {msg.silo_id} step {msg.step} "
                            "(or a gradient of the wrong shape)")
        bundle = self.batches.add_grad(msg)
        if bundle.complete():
            self.finish_bundle(bundle)

    def poll(self) -> None:
        for bundle in self.batches.expired():
            self.finish_bundle(bundle)
        for step, group in list(self.groups.items()):
            if group.overdue():
                log.warning("step %d: applied without the last pieces of %s", step,
                            ", ".join(sorted(group.seen - group.last_seen - group.dropped)))
                self._apply_group(group)

    def finish_bundle(self, bundle: OpenBundle) -> None:
        started = time.perf_counter()
        group = self.group_of.pop(id(bundle), None)
        missing = [m for m in bundle.members if m.silo_id not in bundle.grads]
        grads = {}
        if len(missing) == len(bundle.members):
            self.batches.close(bundle)  # nothing came back: no update from this batch
        else:
            grads = self.batches.backward(bundle)
        busy_s = bundle.forward_s + time.perf_counter() - started
        if group is None:
            if grads:
                self._apply(len(grads), busy_s)
        else:
            group.open -= 1
            group.busy_s += busy_s
            group.contributed.update(grads)
            group.dropped.update(m.silo_id for m in missing)
            if group.complete():
                self._apply_group(group)
        # A step still open (its pieces' update is not applied yet) will be the next update: the
        # counter says which update the silo's step is in, as without micro-batches.
        pending = group is not None and self.groups.get(group.step) is group
        applied = step_counters(self.updates + pending, busy_s)
        for m in bundle.members:
            reply = None if m.silo_id not in grads else Message(
                Kind.BACKWARD_RESULT, m.run_id, m.silo_id, m.round, m.step,
                tensors=[grads[m.silo_id].to(self.model.wire_dtype), applied])
            for ready in self.replies.done(m.silo_id, m.step, id(bundle), reply):
                self.ctx.send(ready)
        timeout_s = self.settings.straggler_timeout_s
        for m in missing:
            log.warning("straggler: %s step %d sent no gradient within %.0fs; its slice counted as zero",
                        m.silo_id, m.step, timeout_s, extra={"reason": "straggler"})
            self.ctx.send(Message(Kind.ERROR, m.run_id, m.silo_id, m.round, m.step,
                                  text=ErrorReason.of(Reason.STRAGGLER, f"no gradient within {timeout_s:.0f}s").to_text()))

    def _apply_group(self, group: StepGroup) -> None:
        self.groups.pop(group.step, None)
        if group.contributed:
            self._apply(len(group.contributed), group.busy_s)

    def _apply(self, contributed: int, busy_s: float) -> None:
        """One update: the trunk's accumulated gradients averaged over the silos that contributed,
        as with a mean loss over the silos of the batch."""
        for p in self.model.trainable:
            if p.grad is not None:
                p.grad.div_(contributed)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.ctx.metrics.step(busy_s)

    def clear(self) -> None:
        super().clear()
        self.batches.by_member.clear()
        self.groups.clear()
        self.group_of.clear()
        self.replies.clear()
