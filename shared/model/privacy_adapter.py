"""A learned silo-side defense of the cut: a privacy adapter trained against the silo's own inverter.

Clipping plus noise (cut_defense.py) blurs every direction of h1 alike, so it buys privacy only at a
ruinous cost. Here the silo learns WHERE to put its signal: a small adapter on the head's output is
trained with the task loss minus ``strength`` times the loss of an inverter that the silo trains on
its own defended activations, alternating (adversarial representation learning, as in the
information-bottleneck defenses of split learning). Both stay on the silo: neither the adapter nor
the inverter is ever sent to the trunk (average them only among silos, by secure aggregation).

One training step on the silo (`defend` is called where `protect_cut` is called today):

    h1 = head(ids, mask, positions)
    d = defend(adapter, h1, mask, cut.clip_norm, cut.sigma, generator)   # adapter, clip, noise
    t = vocab.targets(ids, mask); table = vocab.table(embeddings)        # the silo's own vocabulary
    inverter_step(inverter, inverter_opt, d, t, mask, table)            # the silo's attacker learns
    adv = adversarial_term(inverter, d, t, mask, table, cfg.strength)    # ... and is fought
    frame = seal(d); grad_d = <dL/dd from the trunk>
    torch.autograd.backward([d, adv], [grad_d, None])                   # head, adapter get both
    optimizer.step(); adapter_opt.step()   # the head's LoRA; the adapter (cfg.adapter_lr)

Why noise matters: the adapter alone is an invertible map (a deterministic, known head can be
inverted by an attacker retrained on it); what it can do is move token identity into directions the
clipping budget shrinks below the noise, keeping the task's directions above it. With sigma 0 it can
only fool the silo's own inverter, which a retrained attacker undoes -- the audit measures exactly that.

A rank-k bottleneck (privacy_bottleneck.py, ``bottleneck`` k > 0) can take the adapter's place in
every call above: not invertible, it removes what lies outside its subspace even from an attacker
who knows it.

The adversarial loss is the inverter's cross-entropy capped at log(V) (uniform guessing): beyond
that the silo would only be teaching the inverter to be confidently wrong, which costs utility and
buys nothing against an attacker who retrains. Pure modules and functions: no role imports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from shared.model.cut_defense import protect_cut
from shared.model.privacy_bottleneck import PrivacyBottleneck


class PrivacyAdapterConfig(BaseModel):
    """The silo's learned-defense setting; ``enabled`` is False at strength 0 (no adapter at all).

    The clipping and noise after the adapter stay cut_defense.CutDefenseConfig's (with its secret seed).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    strength: float = Field(0.0, ge=0.0,
                            description="lambda: weight of the inverter's loss subtracted from the task loss")
    rank: int = Field(32, ge=1, description="rank of the adapter's low-rank part")
    inverter_lr: float = Field(1e-3, gt=0.0, description="the silo inverter's Adam step size")
    inverter_steps: int = Field(2, ge=1, description="inverter updates per training step (on that step's activations)")
    adapter_lr: float = Field(1e-2, gt=0.0, description="the privacy adapter's own Adam step size")
    warmup_steps: int = Field(0, ge=0, description="head-only steps before training: see warmup_step")
    distortion: float = Field(1.0, ge=0.0, description="warm-up weight of the adapter's relative change of h1")
    bottleneck: int = Field(0, ge=0, description="k > 0: a rank-k bottleneck U(D(h)) instead of the residual "
                                                 "adapter (privacy_bottleneck.py); ``rank`` is then unused")

    @property
    def enabled(self) -> bool:
        # a bottleneck removes information even at strength 0 (its lambda-0 control is a defense too)
        return self.strength > 0.0 or self.bottleneck > 0


class PrivacyAdapter(nn.Module):
    """h -> h @ (diag(gain) + V U^T) per token: the identity at init (gain 1, U 0).

    The diagonal gain can shrink any coordinate and the rank-``rank`` part can cancel or rotate a
    subspace: a residual adapter (h + f(h)) could add signal but never remove it. rank <= hidden.
    """

    def __init__(self, hidden_size: int, rank: int = 32, seed: int = 0):
        super().__init__()
        if not 1 <= rank <= hidden_size:
            raise ValueError(f"rank must be in 1..{hidden_size} (the hidden size), got {rank}")
        gen = torch.Generator().manual_seed(seed)
        self.gain = nn.Parameter(torch.ones(hidden_size))
        self.down = nn.Parameter(torch.randn(hidden_size, rank, generator=gen) / math.sqrt(hidden_size))
        self.up = nn.Parameter(torch.zeros(rank, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.gain + (hidden @ self.down) @ self.up


def privacy_module(cfg: PrivacyAdapterConfig, hidden_size: int, seed: int = 0) -> nn.Module:
    """The silo's learned map before clip + noise: the bottleneck when ``cfg.bottleneck``, else the adapter.

    Both are used alike from here on (`defend`, `warmup_step`, the audit's TrainedHead); a
    bottleneck should then be set to its data's principal directions (PrivacyBottleneck.init_principal).
    """
    if cfg.bottleneck:
        return PrivacyBottleneck(hidden_size, cfg.bottleneck, seed=seed)
    return PrivacyAdapter(hidden_size, cfg.rank, seed=seed)


class SiloInverter(nn.Module):
    """The silo's own attacker: defended activations [B, T, H] -> logits over the vocabulary [B, T, V].

    Same shape of network as the audit's learned attacker (normalised input, a convolution over
    neighbouring positions, a residual MLP) but scored against the embedding table it is given
    (the silo has no shadow vocabulary: its own text is the training data), so it holds only
    O(H^2) parameters whatever the vocabulary.
    """

    def __init__(self, hidden_size: int, width: int = 2):
        super().__init__()
        self.norm_in = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.context = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width * hidden_size), nn.GELU(),
                                 nn.Linear(width * hidden_size, hidden_size))
        self.norm_out = nn.LayerNorm(hidden_size)
        self.scale = nn.Parameter(torch.tensor(10.0))  # logits = scale x cosine to each embedding

    def forward(self, defended: torch.Tensor, attention_mask: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        z = self.norm_in(defended.float()) * attention_mask.unsqueeze(-1).float()
        z = z + self.context(z.transpose(1, 2)).transpose(1, 2)
        z = z + self.mlp(z)
        return self.scale * F.normalize(self.norm_out(z), dim=-1) @ F.normalize(table.detach().float(), dim=-1).T


class SiloVocabulary:
    """The tokens the silo's inverter guesses among: every token id of the silo's own data.

    The silo knows its vocabulary, and scoring 49k rows for every token would make the inverter cost
    as much as the model on a CPU silo; a token outside it (none, when built from the whole training
    set) is ignored. ``targets`` maps ids to rows of ``table``, pads to -100.
    """

    def __init__(self, token_ids: torch.Tensor, vocab_size: int):
        self.ids = torch.unique(token_ids.flatten())
        if len(self.ids) == 0 or int(self.ids.min()) < 0 or int(self.ids.max()) >= vocab_size:
            raise ValueError(f"token ids must be a non-empty set within 0..{vocab_size - 1}")
        self.index = torch.full((vocab_size,), -100, dtype=torch.long)
        self.index[self.ids] = torch.arange(len(self.ids))

    def table(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.detach()[self.ids.to(embeddings.device)]

    def targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        out = self.index.to(input_ids.device)[input_ids]
        return out.masked_fill(~attention_mask.bool(), -100)


def _check(defended: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if defended.dim() != 3 or tuple(targets.shape) != tuple(defended.shape[:2]):
        raise ValueError(f"defended must be [batch, tokens, hidden] matching targets {tuple(targets.shape)}, "
                         f"got {tuple(defended.shape)}")
    if tuple(attention_mask.shape) != tuple(targets.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match targets "
                         f"{tuple(targets.shape)}")
    if not (targets != -100).any():
        raise ValueError("no real tokens: the inverter has nothing to learn from")


def inversion_loss(inverter: SiloInverter, defended: torch.Tensor, targets: torch.Tensor,
                   attention_mask: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the inverter's guess of each real token; ``targets`` are rows of
    ``table`` (SiloVocabulary.targets), -100 where ignored."""
    _check(defended, targets, attention_mask)
    logits = inverter(defended, attention_mask, table)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def inverter_step(inverter: SiloInverter, optimizer: torch.optim.Optimizer, defended: torch.Tensor,
                  targets: torch.Tensor, attention_mask: torch.Tensor, table: torch.Tensor,
                  steps: int = 1) -> float:
    """``steps`` updates of the silo's inverter on this step's activations (detached: the head is
    not touched); returns the loss before the last update."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    inverter.requires_grad_(True)
    observed = defended.detach()
    for _ in range(steps):
        loss = inversion_loss(inverter, observed, targets, attention_mask, table)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def adversarial_term(inverter: SiloInverter, defended: torch.Tensor, targets: torch.Tensor,
                     attention_mask: torch.Tensor, table: torch.Tensor, strength: float) -> torch.Tensor:
    """-strength x min(inverter loss, log V): add it to the silo's loss (its gradient reaches the
    adapter and the head, never the inverter, whose parameters are frozen for this term)."""
    if not strength >= 0:  # also rejects NaN
        raise ValueError(f"strength must be >= 0, got {strength}")
    inverter.requires_grad_(False)
    try:
        loss = inversion_loss(inverter, defended, targets, attention_mask, table)
    finally:
        inverter.requires_grad_(True)
    return -strength * loss.clamp(max=math.log(table.shape[0]))


def warmup_step(adapter: nn.Module, adapter_opt: torch.optim.Optimizer, inverter: SiloInverter,
                inverter_opt: torch.optim.Optimizer, hidden: torch.Tensor, targets: torch.Tensor,
                attention_mask: torch.Tensor, table: torch.Tensor, cfg: PrivacyAdapterConfig,
                clip_norm: float | None, sigma: float, generator: torch.Generator | None) -> tuple[float, float]:
    """One head-only step before training: the inverter learns, then the adapter fights it while
    paying ``cfg.distortion`` x its mean relative change of h1 (what the trunk was trained on).

    Why: the task step needs the whole split model, so a silo affords few of them; this step needs
    the head alone (``hidden`` is its output, detached), so many of them give the adapter and the
    inverter a start. The distortion term stands in for the task loss, which it cannot see.
    Returns (inverter loss, distortion).
    """
    hidden = hidden.detach()
    defended = defend(adapter, hidden, attention_mask, clip_norm, sigma, generator)
    inverter_loss = inverter_step(inverter, inverter_opt, defended, targets, attention_mask, table, cfg.inverter_steps)
    real = attention_mask.bool()
    change = (adapter(hidden) - hidden).pow(2).sum(-1) / hidden.pow(2).sum(-1).clamp_min(1e-12)
    distortion = change[real].mean()
    adversarial = adversarial_term(inverter, defended, targets, attention_mask, table, cfg.strength)
    loss = adversarial + cfg.distortion * distortion
    adapter_opt.zero_grad(set_to_none=True)
    loss.backward()
    adapter_opt.step()
    return inverter_loss, float(distortion.detach())


def defend(adapter: nn.Module | None, hidden: torch.Tensor, attention_mask: torch.Tensor,
           clip_norm: float | None, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """What leaves the silo: the adapter or bottleneck (None: none) on the head's output, then `protect_cut`."""
    if adapter is not None:
        hidden = adapter(hidden)
    return protect_cut(hidden, attention_mask, clip_norm, sigma, generator)
