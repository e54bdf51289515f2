"""The learned privacy defense in a live silo: a privacy adapter trained against the silo's own inverter.

The pieces (adapter, inverter, vocabulary, the adversarial term) are shared/model/privacy_adapter.py,
as `splitfed audit defend` trains them (splitfed/audit/utility.py); this module runs them inside
SiloAgent.train_step (the non-micro-batched path), one step:

    h1 = head(ids)                                   agent
    d = defend(h1)            adapter, clip, noise   here: what leaves the silo instead of h1
    FORWARD(d) -> trunk                              agent
    train_inverter()          while the trunk works: the silo's inverter learns on d (detached),
                              then adv = -lambda * min(its loss, log V), a graph through the adapter
    FORWARD_RESULT, tail loss, BACKWARD, BACKWARD_RESULT dL/dd       agent
    backward(d, dL/dd)        the head and the adapter get dL/dd plus adv's gradient;
                              the adapter's own Adam steps here, the head's LoRA in the agent's optimizer

Where its parameters live, and why: the adapter and the inverter are never in ``agent.trainable``,
so secure aggregation (silo_agent/aggregation.py averages exactly that list) never uploads them and
the trunk never sees them. They go into this silo's round checkpoints (under ``privacy/``, so a
rollback or restart restores them with the head) and, at the end, into
``save_dir/privacy/<silo>.safetensors``: a subfolder, because ``save_dir/*.safetensors`` are the
federated parts that `splitfed demo --check-centralized` compares with its (undefended) reference.

Warm-up (privacy_adapter.warmup_step) runs once, before the first round's checkpoint, on the silo's
own batches and head alone: it needs no trunk, so it costs no federation time. A silo that resumes
from a checkpoint has its warmed-up adapter there and skips it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.model.cut_defense import CutDefenseConfig, noise_generator
from shared.model.model_split import positions_from_mask
from shared.model.privacy_adapter import (
    PrivacyAdapter,
    PrivacyAdapterConfig,
    SiloInverter,
    SiloVocabulary,
    adversarial_term,
    defend,
    inverter_step,
    warmup_step,
)
from shared.state import checkpoint
from shared.state.atomic_files import atomic_path
from silo_agent.peer_errors import PeerError

log = logging.getLogger("silo")

PREFIX = "privacy/"  # this defense's tensors in the silo's round checkpoints


def privacy_config(settings) -> PrivacyAdapterConfig | None:
    """The learned defense of these SiloSettings, or None when it is off (strength 0).

    Raises ValueError (the silo exits with CONFIG) for settings it cannot honour.
    """
    if settings.privacy_strength == 0:
        return None
    if not math.isfinite(settings.privacy_strength):
        raise ValueError(f"privacy_strength must be a finite number >= 0, got {settings.privacy_strength}")
    if settings.micro_batches != 1:
        # A micro-batched step would need one inverter update and one adversarial term per
        # micro-batch, and noise drawn per micro-batch: not built (silo_agent/microbatch.py).
        raise ValueError(f"privacy_strength > 0 needs micro_batches 1 (got {settings.micro_batches!r}): the "
                         "learned privacy defense runs only in the non-micro-batched step")
    return PrivacyAdapterConfig(strength=settings.privacy_strength, rank=settings.privacy_rank,
                                inverter_lr=settings.privacy_inverter_lr,
                                inverter_steps=settings.privacy_inverter_steps, adapter_lr=settings.privacy_lr,
                                warmup_steps=settings.privacy_warmup_steps, distortion=settings.privacy_distortion)


class SiloPrivacyDefense:
    """The silo's privacy adapter, its inverter, their optimizers, and this step's pending term."""

    def __init__(self, cfg: PrivacyAdapterConfig, cut: CutDefenseConfig, head, dataset, silo_index: int,
                 seed: int) -> None:
        self.cfg, self.cut, self.head, self.dataset = cfg, cut, head, dataset
        self.silo_index = silo_index
        embeddings = self._embeddings()
        hidden = embeddings.shape[1]
        if cfg.rank > hidden:
            raise ValueError(f"privacy_rank must be in 1..{hidden} (this model's hidden size), got {cfg.rank}")
        # The silo knows its own vocabulary: its inverter guesses among the tokens of its data only.
        self.vocab = SiloVocabulary(torch.tensor([t for ids, _ in dataset.encoded for t in ids]),
                                    embeddings.shape[0])
        self.adapter = PrivacyAdapter(hidden, cfg.rank, seed=seed)
        with torch.random.fork_rng(devices=[]):  # the inverter's init must not move the run's RNG
            torch.manual_seed(seed)
            self.inverter = SiloInverter(hidden)
        self.inverter_opt = torch.optim.Adam(self.inverter.parameters(), lr=cfg.inverter_lr)
        # its own optimizer: the adapter must move within a few steps, the LoRA at its own pace
        self.adapter_opt = torch.optim.Adam(self.adapter.parameters(), lr=cfg.adapter_lr)
        self.warmup_losses: list[float] = []
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (d, targets, mask)
        self._adversarial: torch.Tensor | None = None
        self.inverter_loss: float | None = None  # this step's, for the results history
        if cut.sigma == 0:
            log.warning("privacy adapter without cut noise: it can only fool the silo's own inverter, "
                        "an attacker retrained on the trained head undoes it (set --cut-noise-sigma)")
        elif cut.clip_norm is None:
            log.warning("privacy adapter with noise but no clipping: the adapter can grow its output until the "
                        "noise is negligible (set --cut-clip-norm)")

    def _embeddings(self) -> torch.Tensor:
        return self.head.get_submodule(self.head.facts.embed).weight

    def _generator(self, *identity: int | str) -> torch.Generator | None:
        return noise_generator(self.cut.seed, *identity) if self.cut.sigma > 0 else None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.adapter.parameters(), *self.inverter.parameters()]

    # ------------------------------------------------------------------ before training
    def warm_up(self) -> None:
        """privacy_adapter.warmup_step on the silo's first batches, head only (no grads into it)."""
        for step in range(self.cfg.warmup_steps):
            batch = self.dataset.batch(step)
            mask = batch.attention_mask
            with torch.no_grad():
                hidden = self.head(batch.input_ids, mask, positions_from_mask(mask))
            loss, _ = warmup_step(self.adapter, self.adapter_opt, self.inverter, self.inverter_opt, hidden.float(),
                                  self.vocab.targets(batch.input_ids, mask), mask, self.vocab.table(self._embeddings()),
                                  self.cfg, self.cut.clip_norm, self.cut.sigma,
                                  self._generator("privacy-warmup", self.silo_index, step))
            self.warmup_losses.append(loss)
        if self.warmup_losses:
            log.info("privacy warm-up: %d head-only steps, silo inverter loss %.4f -> %.4f", len(self.warmup_losses),
                     self.warmup_losses[0], self.warmup_losses[-1])

    # ------------------------------------------------------------------ one training step
    def defend(self, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, rnd: int,
               step: int) -> torch.Tensor:
        """What leaves the silo instead of the head's output: adapter, then clipping and noise.

        The noise is drawn from the same (secret seed, silo, round, step) identity as the cut defense's.
        """
        defended = defend(self.adapter, hidden, mask, self.cut.clip_norm, self.cut.sigma,
                          self._generator(self.silo_index, rnd, step)).to(hidden.dtype)
        self._pending = (defended, self.vocab.targets(input_ids, mask), mask)
        self._adversarial, self.inverter_loss = None, None
        return defended

    def train_inverter(self) -> None:
        """The inverter's updates on this step's defended activations, then the adversarial term.

        Called right after the FORWARD leaves, so it runs while the trunk works; once per step (a
        retried step resends the same activations and keeps its term).
        """
        if self._pending is None or self._adversarial is not None:
            return
        defended, targets, mask = self._pending
        table = self.vocab.table(self._embeddings())
        self.inverter_loss = inverter_step(self.inverter, self.inverter_opt, defended, targets, mask, table,
                                           self.cfg.inverter_steps)
        self._adversarial = adversarial_term(self.inverter, defended, targets, mask, table, self.cfg.strength)

    def backward(self, defended: torch.Tensor, grad: torch.Tensor) -> None:
        """dL/dd from the trunk plus the adversarial term's gradient into the head and the adapter;
        then the adapter's own step (the agent steps the head's LoRA)."""
        self.train_inverter()  # a no-op unless the agent did not call it while the trunk worked
        torch.autograd.backward([defended, self._adversarial], [grad, None])
        self.adapter_opt.step()
        self.adapter_opt.zero_grad(set_to_none=True)
        self._pending = self._adversarial = None

    def step_record(self) -> dict:
        """What this step adds to the silo's results history."""
        return {} if self.inverter_loss is None else {"inverter_loss": round(self.inverter_loss, 6)}

    def drop_step(self) -> None:
        """A step that was not applied (straggler, rollback): forget its graph and its gradients."""
        self._pending = self._adversarial = None
        self.adapter_opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ on disk
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Adapter, inverter and both optimizers' state, for the silo's round checkpoint."""
        out = {f"{PREFIX}adapter/{k}": v for k, v in self.adapter.state_dict().items()}
        out.update({f"{PREFIX}inverter/{k}": v for k, v in self.inverter.state_dict().items()})
        for name, opt in (("adapter_opt", self.adapter_opt), ("inverter_opt", self.inverter_opt)):
            out.update({f"{PREFIX}{name}/{k}": v for k, v in checkpoint.optimizer_tensors(opt).items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not any(k.startswith(PREFIX) for k in tensors):
            raise PeerError("this silo's checkpoint has no privacy adapter (written with privacy_strength 0): "
                            "resume with the settings it was written with, or start over in a new checkpoint dir")
        for name, module in (("adapter", self.adapter), ("inverter", self.inverter)):
            module.load_state_dict(_under(tensors, f"{PREFIX}{name}/"))
        for name, opt in (("adapter_opt", self.adapter_opt), ("inverter_opt", self.inverter_opt)):
            checkpoint.load_optimizer_tensors(opt, _under(tensors, f"{PREFIX}{name}/"))
        self.drop_step()

    def save(self, save_dir: Path, silo_id: str) -> Path:
        """The trained adapter and inverter: the silo's own, beside (not among) its federated weights."""
        path = save_dir / "privacy" / f"{silo_id}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"adapter/{k}": v for k, v in self.adapter.state_dict().items()}
        tensors.update({f"inverter/{k}": v for k, v in self.inverter.state_dict().items()})
        tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        return path

    def summary(self) -> dict:
        return {"strength": self.cfg.strength, "rank": self.cfg.rank,
                "adapter_params": sum(p.numel() for p in self.adapter.parameters()),
                "inverter_params": sum(p.numel() for p in self.inverter.parameters()),
                "warmup_inverter_loss": [round(v, 6) for v in self.warmup_losses]}


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
