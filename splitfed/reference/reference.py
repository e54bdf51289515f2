"""The unsplit reference: the plain HF model with the same adapter, run by its own forward.

Used by the equivalence tests and by `splitfed demo --check-centralized`. Parameter names equal the
parts' names, and adapters are initialised from (seed, name), so split and unsplit start identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.model.adapters import (
    AdapterConfig,
    apply_adapter,
    layers_by_index,
    prefix_cache,
    prefix_len,
    with_prefix,
)
from shared.model.families import facts_for
from shared.model.model_split import SplitPlan
from shared.model.part_loading import build_full_model
from shared.model.quantize import quantize_linears


class UnsplitModel:
    """Not an nn.Module on purpose: wrapping would prefix every name with "model."."""

    def __init__(
        self,
        model_dir: str | Path,
        adapter_cfg: AdapterConfig,
        seed: int,
        head_layers: int = 1,
        tail_layers: int = 1,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        trunk_quant: str = "none",
    ):
        self.model = build_full_model(model_dir, dtype=dtype, attn_implementation=attn_implementation)
        self.facts = facts_for(self.model.config)
        self.plan = SplitPlan(self.model.config.num_hidden_layers, head_layers, tail_layers)
        layers = layers_by_index(self.model)
        for j in self.plan.trunk_range:  # the same quantized base as a --trunk-quant worker holds
            quantize_linears(layers[j], trunk_quant, dtype, torch.device("cpu"))
        self.trainable = apply_adapter(self.model, adapter_cfg, seed)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        layers = layers_by_index(self.model)
        p = prefix_len(layers)
        cache = None
        if p:
            # The HF forward sizes its masks from the cache (P entries per layer) and the P+T mask.
            cache = prefix_cache(layers, input_ids.shape[0])
            attention_mask, position_ids = with_prefix(attention_mask, position_ids, p)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            # measured: with use_cache=False the layers still read and extend a cache that is passed
            # (Llama/Qwen2/Mistral/GPT-2 in 5.23); only the creation of a new one is skipped.
            use_cache=False,
        )
        return out.logits

    __call__ = forward

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def part_of(self, name: str) -> str:
        """The split part ("head", "trunk" or "tail") that holds parameter ``name`` (same SplitPlan)."""
        owner = self.facts.owner_of(name)
        return self.plan.part_of(owner) if isinstance(owner, int) else {"embed": "head", "top": "tail"}[owner]

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by the part that holds them in the split."""
        groups: dict[str, list[nn.Parameter]] = {"head": [], "trunk": [], "tail": []}
        for name, p in self.named_trainable().items():
            groups[self.part_of(name)].append(p)
        return groups

    def part_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of the trainable tensors by part, under every name: a tied embedding is listed as
        the head's embedding AND the tail's LM head, as the parts' own state dicts (and files) list it."""
        states: dict[str, dict[str, torch.Tensor]] = {"head": {}, "trunk": {}, "tail": {}}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                states[self.part_of(name)][name] = p.detach().clone()
        return states
