"""The trunk's step runner for client-batch mode: one trunk batch from several silos' steps.

The broker bundles one step's FORWARDs from up to M silos (BUNDLE); the worker opens each member
with its own silo's session and hands them here. One forward runs over the concatenated batch
(trunk_worker/batch_step.py); each silo gets its slice of the output. When every member's gradient
is in, or when the straggler timeout passes, one backward and one optimizer step follow; a silo
that sent no gradient in time is told (ERROR "straggler") and its slice counts as zero.
"""

from __future__ import annotations

import logging
import time

import torch

from shared.wire.protocol import ErrorReason, Kind, Reason
from shared.wire.wire import Message
from trunk_worker.batch_step import BatchSteps, OpenBundle
from trunk_worker.serial_steps import RunnerContext, SerialSteps, TrunkModel
from trunk_worker.step_error import StepError

log = logging.getLogger("trunk")


class ClientBatchSteps(SerialSteps):
    def __init__(self, model: TrunkModel, ctx: RunnerContext) -> None:
        super().__init__(model, ctx)
        self.batches = BatchSteps(model.trunk, model.device, model.compute_dtype, ctx.settings.straggler_timeout_s)

    def bundle(self, members: list[Message]) -> None:
        _, outputs = self.batches.forward(members)
        for m, out in zip(members, outputs):
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

    def finish_bundle(self, bundle: OpenBundle) -> None:
        started = time.perf_counter()
        missing = [m for m in bundle.members if m.silo_id not in bundle.grads]
        if len(missing) == len(bundle.members):
            for m in bundle.members:  # nothing came back: no update at all
                self.batches.by_member.pop((m.silo_id, m.step), None)
        else:
            grads = self.batches.backward(bundle, self.model.trainable)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
            self.ctx.metrics.step(bundle.forward_s + time.perf_counter() - started)
            applied = torch.tensor([self.updates], dtype=torch.int64)
            for m in bundle.members:
                if m.silo_id in grads:
                    self.ctx.send(Message(Kind.BACKWARD_RESULT, m.run_id, m.silo_id, m.round, m.step,
                                          tensors=[grads[m.silo_id].to(self.model.wire_dtype), applied]))
        timeout_s = self.settings.straggler_timeout_s
        for m in missing:
            log.warning("straggler: %s step %d sent no gradient within %.0fs; its slice counted as zero",
                        m.silo_id, m.step, timeout_s, extra={"reason": "straggler"})
            self.ctx.send(Message(Kind.ERROR, m.run_id, m.silo_id, m.round, m.step,
                                  text=ErrorReason.of(Reason.STRAGGLER, f"no gradient within {timeout_s:.0f}s").to_text()))

    def clear(self) -> None:
        super().clear()
        self.batches.by_member.clear()
