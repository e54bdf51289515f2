"""The curious trunk operator's three inversion attacks on cut activations.

The attacker sees what crosses the wire for a step: the cut activations [B, T, H] (after the silo's
defense, if any) and the padding mask. It holds the public base weights (embeddings and head
blocks), knows the cut and the defense's settings (Kerckhoffs: only the noise draws are secret),
and has public shadow text of its own. Each attack returns guessed token ids [B, T].

(c) nearest embedding: each vector's most similar row of the embedding table (cosine: scale-free,
    so clipping alone cannot hide a token from it). Exact for an undefended embeddings-only cut.
(b) optimization: find input embeddings whose image under the public head blocks (and the
    defense's clipping) matches the observation, then project each to its nearest token.
(a) learned: a network trained on the attacker's shadow text, pushed through the same public head
    and the same defense (fresh noise every batch), to map cut activations back to tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.model.cut_defense import clip_token_norms, protect_cut
from shared.model.model_split import positions_from_mask
from shared.model.privacy_adapter import PrivacyAdapterConfig
from splitfed.audit.cut import HeadBlocks

OnStep = Callable[[int, int, float], None]  # (step, of_steps, loss)

# Rows of [rows x V] similarity computed at once: bounds memory to ~100 MB for a 49k vocabulary.
_PROJECT_CHUNK = 512


@dataclass(frozen=True)
class Defense:
    """What the silo applied (and the attacker knows): clip_norm None and sigma 0 is no defense.

    ``learned`` (strength > 0) adds a privacy adapter trained during the fine-tune, before the
    clipping and noise. `apply` is the clipping and noise only: the trained adapter is part of the
    defended head the attacker is given (splitfed/audit/cut.py: TrainedHead).
    """

    clip_norm: float | None = None
    sigma: float = 0.0
    learned: PrivacyAdapterConfig | None = None

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None or self.sigma > 0 or self.adapted

    @property
    def adapted(self) -> bool:
        return self.learned is not None and self.learned.enabled

    def apply(self, hidden: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.enabled:
            return hidden
        return protect_cut(hidden, attention_mask, self.clip_norm, self.sigma, generator)


def _descend(opt, sched, loss: torch.Tensor, step: int, steps: int, on_step: OnStep | None) -> None:
    """One optimizer step on ``loss``, then the schedule and the progress report."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if on_step is not None:
        on_step(step + 1, steps, loss.item())


# ---- (c) nearest embedding ---------------------------------------------------------------------


@torch.no_grad()
def nearest_tokens(vectors: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of each vector's most cosine-similar row of ``table`` [V, H]; ``vectors`` [..., H]."""
    flat = F.normalize(vectors.reshape(-1, vectors.shape[-1]).float(), dim=-1)
    rows = F.normalize(table.float(), dim=-1)
    out = torch.cat([(chunk @ rows.T).argmax(-1) for chunk in flat.split(_PROJECT_CHUNK)])
    return out.reshape(vectors.shape[:-1])


@torch.no_grad()
def nearest_embedding_attack(observed: torch.Tensor, attention_mask: torch.Tensor, head: HeadBlocks) -> torch.Tensor:
    """(c): the token whose embedding each observed vector points at (learned positions removed)."""
    positions = positions_from_mask(attention_mask)
    return nearest_tokens(observed - head.position_part(positions), head.token_embeddings)


# ---- (b) optimization with the public head weights ---------------------------------------------


def optimization_attack(
    observed: torch.Tensor,
    attention_mask: torch.Tensor,
    head: HeadBlocks,
    k: int,
    defense: Defense,
    steps: int,
    lr: float = 1.0,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """(b): gradient descent on input embeddings x so that clip(blocks_k(x)) matches the observation.

    The loss is each real token's squared error relative to its observed norm (tokens of very
    different norms weigh alike); noise is zero-mean, so matching the clipped clean image is the
    maximum-likelihood fit. x starts at the mean embedding; ``lr`` is in units of the embedding
    table's per-coordinate RMS, decayed by a cosine schedule. The result is projected to tokens.
    """
    table = head.token_embeddings.detach()
    positions = positions_from_mask(attention_mask)
    real = attention_mask.bool()
    observed = observed.detach()
    scale = table.float().pow(2).mean().sqrt().item()
    start = table.float().mean(0).expand_as(observed) + head.position_part(positions)
    x = nn.Parameter(start.detach().clone())
    if k == 0 and not defense.enabled:
        x.data.copy_(observed)  # the blocks are the identity: the observation is the answer
        steps = 0
    opt = torch.optim.Adam([x], lr=lr * scale)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    target_sq = observed.pow(2).sum(-1).clamp_min(1e-12)
    for step in range(steps):
        image = head.blocks(x, attention_mask, positions, k)
        if defense.clip_norm is not None:
            image = clip_token_norms(image, defense.clip_norm)
        loss = ((image - observed).pow(2).sum(-1) / target_sq)[real].mean()
        _descend(opt, sched, loss, step, steps, on_step)
    return nearest_tokens(x.detach() - head.position_part(positions), table)


# ---- (a) learned inversion on shadow text ------------------------------------------------------


class InversionNet(nn.Module):
    """Cut activations [B, T, H] -> logits over the attacker's candidate tokens [B, T, V'].

    A normalised input (clipping and block depth change the scale, not the content), a convolution
    over neighbouring positions (a causal model's vector at t+1 also carries token t), a residual
    MLP, and an output layer initialised from the candidates' embedding directions. The residual
    branches start at zero, so the untrained net is the nearest-embedding attack over candidates.
    """

    def __init__(self, hidden_size: int, candidate_embeddings: torch.Tensor, width: int = 2):
        super().__init__()
        self.norm_in = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.context = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width * hidden_size), nn.GELU(),
                                 nn.Linear(width * hidden_size, hidden_size))
        self.norm_out = nn.LayerNorm(hidden_size)
        self.out = nn.Linear(hidden_size, candidate_embeddings.shape[0])
        with torch.no_grad():
            for zero in (self.context.weight, self.context.bias, self.mlp[2].weight, self.mlp[2].bias):
                zero.zero_()
            # LayerNorm output has norm sqrt(H): these rows make the first logits 10 x cosine similarity
            self.out.weight.copy_(F.normalize(candidate_embeddings.float(), dim=-1) * (10.0 / math.sqrt(hidden_size)))
            self.out.bias.zero_()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        z = self.norm_in(hidden.float()) * attention_mask.unsqueeze(-1).float()
        z = z + self.context(z.transpose(1, 2)).transpose(1, 2)
        z = z + self.mlp(z)
        return self.out(self.norm_out(z))


class LearnedInverter:
    """(a): an InversionNet and its candidate vocabulary (the tokens seen in the shadow text)."""

    def __init__(self, net: InversionNet, candidates: torch.Tensor):
        self.net = net
        self.candidates = candidates  # [V'] token ids, sorted

    @torch.no_grad()
    def __call__(self, observed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        guesses = [self.net(h, m).argmax(-1) for h, m in zip(observed.split(64), attention_mask.split(64))]
        return self.candidates[torch.cat(guesses)]

    @classmethod
    def train(
        cls,
        shadow_cut: torch.Tensor,
        shadow_ids: torch.Tensor,
        shadow_mask: torch.Tensor,
        head: HeadBlocks,
        defense: Defense,
        steps: int,
        batch_size: int = 16,
        lr: float = 2e-3,
        seed: int = 0,
        on_step: OnStep | None = None,
    ) -> LearnedInverter:
        """Train on the shadow text's clean cut activations, defended afresh in every batch."""
        candidates = torch.unique(shadow_ids[shadow_mask.bool()])
        index_of = torch.full((head.token_embeddings.shape[0],), -100, dtype=torch.long)
        index_of[candidates] = torch.arange(len(candidates))
        targets = index_of[shadow_ids].masked_fill(~shadow_mask.bool(), -100)

        with torch.random.fork_rng(devices=[]):  # the net's init must not touch the caller's RNG
            torch.manual_seed(seed)
            net = InversionNet(head.hidden_size, head.token_embeddings.detach()[candidates])
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
        net.train()
        for step in range(steps):
            pick = torch.randint(len(shadow_ids), (min(batch_size, len(shadow_ids)),), generator=gen)
            observed = defense.apply(shadow_cut[pick], shadow_mask[pick], gen)
            logits = net(observed, shadow_mask[pick])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[pick].reshape(-1), ignore_index=-100)
            _descend(opt, sched, loss, step, steps, on_step)
        return cls(net, candidates)
