"""The trunk's step runner for hierarchical mode: one trunk adapter per silo over a shared frozen base.

Each silo's steps run through its own adapter with its own optimizer (trunk_worker/silo_adapters.py).
At a round's end the broker names the averaging workers and the silos' FedAvg weights (ROUND_END):
each worker sends its weighted partial sum, sealed, to every averaging worker (TRUNK_SYNC), and
every worker sets all its silos' adapters to the average before it checkpoints the round.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from shared.model.adapter_files import save_adapter_file
from shared.wire.control_text import RoundEnd
from shared.wire.protocol import Kind
from shared.wire.wire import Message
from trunk_worker.checkpointing import load_trunk, save_trunk
from trunk_worker.serial_steps import RunnerContext, SerialSteps, TrunkModel
from trunk_worker.silo_adapters import SiloAdapters
from trunk_worker.trunk_sync import TrunkSync

log = logging.getLogger("trunk")


class HierarchicalSteps(SerialSteps):
    def __init__(self, model: TrunkModel, ctx: RunnerContext, trunk_keys) -> None:
        s = ctx.settings
        if s.adapter == "full":
            raise ValueError("hierarchical mode keeps one trunk ADAPTER per silo: use --adapter lora or prefix")
        self.adapters = SiloAdapters(model.trunk, s.lr, s.weight_decay)
        self.sync = TrunkSync(s.run_id, s.worker_id, trunk_keys)
        super().__init__(model, ctx)

    def _make_optimizer(self) -> None:
        return None  # one per silo, in self.adapters

    def _activate(self, silo: str) -> None:
        self.adapters.activate(silo)  # this silo's own trunk adapter over the shared base

    def _before_backward(self, silo: str) -> None:
        if self.settings.recompute_forward:
            self.adapters.activate(silo)  # the recomputed forward runs through the adapter in the slots now

    def _optimizer_for(self, silo: str) -> torch.optim.Optimizer | None:
        return self.adapters.optimizers[silo]

    def before_generation(self, msg: Message) -> None:
        if msg.kind == Kind.GENERATE:
            self.adapters.activate_for_generation(msg.silo_id)  # its own trunk adapter, not the last one used

    # ------------------------------------------------------------------ round end
    def round_end(self, msg: Message) -> None:
        """Average the trunk adapters across workers when asked (send this worker's weighted partial
        sum to every averaging worker), then checkpoint the round. A second ROUND_END for the round
        (a worker died before its partial came) starts the averaging again: partials of the first
        attempt are dropped."""
        self.sync.forget(msg.round)
        self._forget_kept_results()
        if not msg.text:
            return self.ctx.close_round(msg.round)
        end = RoundEnd.from_text(msg.text)
        workers, weights = list(end.workers), end.weights
        partial, weight = self.adapters.weighted_sum(weights)
        if workers == [self.settings.worker_id]:
            # The only averaging worker: its partial is the whole sum. No TRUNK_SYNC round trip, and
            # no sealed and opened copies of an adapter-sized buffer at the worker's fullest moment.
            if weight <= 0:  # none of the round's silos trained here: nothing to average
                log.warning("round %d: no trunk adapter of %s on this worker; nothing averaged",
                            msg.round, ",".join(sorted(weights)))
                return self.ctx.close_round(msg.round)
            return self._apply_average(msg.round, partial.div_(weight))
        self.sync.expected[msg.round] = workers
        self.ctx.send(Message(Kind.TRUNK_SYNC, msg.run_id, self.settings.worker_id, msg.round,
                              tensors=[self.sync.seal(msg.round, partial, weight)]))

    def trunk_sync(self, msg: Message) -> None:
        average = self.sync.add(msg.round, msg.silo_id, self.sync.open(msg.round, msg.silo_id, msg.tensors[0]))
        if average is not None:
            self._apply_average(msg.round, average)

    def _apply_average(self, rnd: int, average: torch.Tensor) -> None:
        self.adapters.set_all(average)
        log.info("round %d: trunk adapters averaged", rnd)
        self.ctx.close_round(rnd)

    # ------------------------------------------------------------------ state on disk
    def clear(self) -> None:
        super().clear()
        self.sync.expected.clear()
        self.sync.partials.clear()

    def save_checkpoint(self, directory: Path, rnd: int) -> None:
        save_trunk(directory, rnd, self.model.trainable, None, self.adapters, self.updates)

    def load_checkpoint(self, directory: Path, rnd: int) -> int | None:
        return load_trunk(directory, rnd, self.model.trainable, None, self.adapters)

    def save_adapters(self, directory: Path, meta: dict) -> None:
        """The last round's average (the adapter new silos start from) to trunk.safetensors, and each
        silo's own to trunk-<silo>.safetensors: they differ under --personalize or --aggregation none,
        where no average exists and only the per-silo files are written."""
        names = self.adapters.names
        if self.adapters.averaged:
            save_adapter_file(directory / "trunk.safetensors", dict(zip(names, self.adapters.template)), meta)
        for silo, params in sorted(self.adapters.params.items()):
            save_adapter_file(directory / f"trunk-{silo}.safetensors", dict(zip(names, params)), meta)
        log.info("wrote the trunk adapters of %d silos%s to %s", len(self.adapters.params),
                 " and their average" if self.adapters.averaged else " (no round averaged them: no trunk.safetensors)",
                 directory)
