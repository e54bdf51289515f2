"""What the head sends at a cut of k blocks (k = 0: the embeddings alone), from the public weights.

The attacker holds the same public base weights the silo's head starts from, so one object serves
both sides: the victim's activations and the attacker's differentiable copy of the head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.model.part_loading import build_part
from shared.model.model_split import positions_from_mask


class HeadBlocks:
    """Token embeddings and the first ``max_blocks`` decoder blocks of a model, frozen, in fp32."""

    def __init__(self, model_dir: str | Path, max_blocks: int):
        # build_part needs >= 1 head block and a trunk left over; k = 0 uses the embeddings only.
        self.head = build_part(model_dir, "head", head_layers=max(1, max_blocks), tail_layers=1)
        self.head.requires_grad_(False).eval()
        self.max_blocks = max_blocks
        facts = self.head.facts
        self._embed: nn.Embedding = self.head.get_submodule(facts.embed)
        self._pos_embed: nn.Embedding | None = self.head.get_submodule(facts.pos_embed) if facts.pos_embed else None

    @property
    def hidden_size(self) -> int:
        return self._embed.weight.shape[1]

    @property
    def token_embeddings(self) -> torch.Tensor:
        """[V, H]: the public embedding table (also the tied LM head for SmolLM2)."""
        return self._embed.weight

    def position_part(self, positions: torch.Tensor) -> torch.Tensor | float:
        """What learned absolute positions add to a token's embedding (0 for rotary families)."""
        return self._pos_embed(positions) if self._pos_embed is not None else 0.0

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._embed(input_ids) + self.position_part(positions)

    def blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
               k: int) -> torch.Tensor:
        """Run the first ``k`` blocks on ``hidden`` (differentiable in ``hidden``).

        Uses the part's own block runner (model_split's _run_layers) so masks and rotary are built
        exactly as the silo builds them; model_split has no public "blocks from embeddings" call.
        """
        if not 0 <= k <= self.max_blocks:
            raise ValueError(f"cut of {k} blocks: this copy holds 0..{self.max_blocks}")
        if k == 0:
            return hidden
        owned = self.head._layers()
        layers = {i: owned[i] for i in range(k)}
        return self.head._run_layers(hidden, layers, 0, attention_mask, positions)

    @torch.no_grad()
    def cut(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
        """[B, T, H]: what a silo with k head blocks sends, before any defense."""
        positions = positions_from_mask(attention_mask)
        return self.blocks(self.embed(input_ids, positions), attention_mask, positions, k)


class TrainedHead(HeadBlocks):
    """A silo's head after fine-tuning (its LoRA, and a learned defense's privacy adapter), as the
    attacker who knows those trained weights computes it: the retrained attacker's copy of the head.

    Same interface as HeadBlocks, so every attack runs on it unchanged. With an adapter the cut is
    the silo's own (all its blocks, then the adapter); without one any k of its blocks (a fine-tune
    without defense trains the same weights wherever the cut is). Frozen: nothing here trains.
    """

    def __init__(self, head: nn.Module, adapter: nn.Module | None):
        self.head = head
        self.head.requires_grad_(False).eval()
        self.adapter = adapter.requires_grad_(False).eval() if adapter is not None else None
        self.max_blocks = len(head.layer_ids)
        facts = head.facts
        self._embed = head.get_submodule(facts.embed)
        self._pos_embed = head.get_submodule(facts.pos_embed) if facts.pos_embed else None

    def blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
               k: int) -> torch.Tensor:
        if self.adapter is not None and k != self.max_blocks:
            raise ValueError(f"this trained head has {self.max_blocks} blocks, asked for a cut of {k}")
        hidden = super().blocks(hidden, attention_mask, positions, k)
        return self.adapter(hidden) if self.adapter is not None else hidden
