"""Split a causal LM into head (silo), trunk (trunk worker) and tail (silo).

Each part is a container tree that mirrors the full model's module paths, with the blocks in an
nn.ModuleDict keyed by their ORIGINAL index ("5", not "0"). Parameter names are therefore those of
the full model ("model.layers.5.self_attn.q_proj.weight"): weights load by name from the checkpoint
and adapter state dicts map 1:1 onto the unsplit model.

Only the 2-D padding mask and the position ids cross the wire; every part rebuilds its own causal
(and sliding-window) mask and its own rotary embeddings from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from shared.model.adapters import prefix_cache, prefix_len, with_prefix
from shared.model.families import FamilyFacts, facts_for


PARTS = ("head", "trunk", "tail")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a (right-)padded 2-D mask; pads repeat the last real position."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class SplitPlan:
    n_layers: int
    head_layers: int = 1
    tail_layers: int = 1

    def __post_init__(self) -> None:
        if self.head_layers < 1 or self.tail_layers < 1:
            raise ValueError(
                f"head_layers and tail_layers must be >= 1 (got {self.head_layers}, {self.tail_layers}): "
                "the silo keeps at least one block on each side"
            )
        if self.head_layers + self.tail_layers >= self.n_layers:
            raise ValueError(
                f"head_layers + tail_layers = {self.head_layers + self.tail_layers} leaves no trunk "
                f"in a {self.n_layers}-layer model"
            )

    @property
    def head_range(self) -> range:
        return range(0, self.head_layers)

    @property
    def trunk_range(self) -> range:
        return range(self.head_layers, self.n_layers - self.tail_layers)

    @property
    def tail_range(self) -> range:
        return range(self.n_layers - self.tail_layers, self.n_layers)

    def range_of(self, part: str) -> range:
        return {"head": self.head_range, "trunk": self.trunk_range, "tail": self.tail_range}[part]

    def part_of(self, layer_idx: int) -> str:
        for part in PARTS:
            if layer_idx in self.range_of(part):
                return part
        raise ValueError(f"layer {layer_idx} is outside a {self.n_layers}-layer model")


# ---- the parts -----------------------------------------------------------------------------


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` under `root`, creating plain container modules on the way."""
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if name not in node._modules:
            node.add_module(name, nn.Module())
        node = node._modules[name]
    node.add_module(leaf, module)


class _Part(nn.Module):
    """Shared machinery: owned blocks by original index, masks, rotary, prefix handling."""

    def __init__(self, config: PreTrainedConfig, layer_ids: range):
        super().__init__()
        self.config = config
        self.facts: FamilyFacts = facts_for(config)
        self.layer_ids = list(layer_ids)
        types = self.facts.layer_types(config)
        self._types = {i: types[i] for i in self.layer_ids}

    def _layers(self) -> dict[int, nn.Module]:
        return {i: self.get_submodule(self.facts.layers)[str(i)] for i in self.layer_ids}

    def _wire_inputs(self, attention_mask, position_ids):
        """Extend mask/positions for this part's prefix (if any); the wire never carries the shift."""
        layers = self._layers()
        p = prefix_len(layers)
        if p:
            attention_mask, position_ids = with_prefix(attention_mask, position_ids, p)
        return layers, p, attention_mask, position_ids

    def new_cache(self, batch: int) -> DynamicCache:
        """A KV cache for generation through this part: empty, or holding its prefix K/V.

        Passed to forward(..., cache=) it keeps every owned layer's keys and values across calls,
        so each call only computes the new positions. The mask given with it must then cover every
        key seen so far (past + new), the positions only the new tokens.
        """
        layers = self._layers()
        return prefix_cache(layers, batch) if prefix_len(layers) else DynamicCache()

    def _run_layers(self, hidden, layers, p, attention_mask, position_ids, cache=None):
        if cache is None and p:
            cache = prefix_cache(layers, hidden.shape[0])  # fresh per forward: training recomputes all
        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            # Measured (transformers 5.23): without layer_idx the mask is sized on the cache's first
            # full-attention layer, i.e. layer 0 -- an empty lazily-grown slot ("length 0") in a
            # trunk or tail, giving a T-key mask for P+T keys. Size it on a layer this part owns.
            layer_idx=self.layer_ids[0],
        )
        mask_kwargs["cache"] = cache
        # Always a 2-D mask, never None: with mask None and no cache, HF reads repeated position ids
        # (right padding from positions_from_mask) as packed sequences and builds a different mask.
        # Under SDPA it returns None when nothing is padded (plain is_causal): that is correct.
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in self._types.values():
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        layer_kwargs = {"position_ids": position_ids, "cache": cache}
        rotary = {}  # per layer type: Gemma 3's local and global layers rotate with other bases
        if self.facts.rotary:
            rotary_emb = self.get_submodule(self.facts.rotary)
            for kind in set(self._types.values()):
                args = (kind,) if self.facts.rotary_per_layer_type else ()
                rotary[kind] = rotary_emb(hidden, position_ids, *args)
        for i, layer in layers.items():
            if rotary:
                layer_kwargs["position_embeddings"] = rotary[self._types[i]]
            hidden = layer(hidden, attention_mask=masks[self._types[i]], **layer_kwargs)
        return hidden


class HeadPart(_Part):
    """Silo input side: embeddings (+ learned positions) and the first blocks."""

    def forward(self, input_ids, attention_mask, position_ids, cache=None):
        layers, p, attention_mask, position_ids = self._wire_inputs(attention_mask, position_ids)
        hidden = self.get_submodule(self.facts.embed)(input_ids)
        if self.facts.embed_scale is not None:
            hidden = hidden * self.facts.embed_scale(self.config)
        if self.facts.pos_embed:
            hidden = hidden + self.get_submodule(self.facts.pos_embed)(position_ids)
        if self.facts.embed_dropout:
            hidden = self.get_submodule(self.facts.embed_dropout)(hidden)
        return self._run_layers(hidden, layers, p, attention_mask, position_ids, cache)


class TrunkPart(_Part):
    """Trunk worker: the middle blocks only."""

    def forward(self, hidden, attention_mask, position_ids, cache=None):
        layers, p, attention_mask, position_ids = self._wire_inputs(attention_mask, position_ids)
        return self._run_layers(hidden, layers, p, attention_mask, position_ids, cache)


class TailPart(_Part):
    """Silo output side: the last blocks, final norm and LM head; returns logits."""

    def forward(self, hidden, attention_mask, position_ids, cache=None):
        layers, p, attention_mask, position_ids = self._wire_inputs(attention_mask, position_ids)
        hidden = self._run_layers(hidden, layers, p, attention_mask, position_ids, cache)
        hidden = self.get_submodule(self.facts.final_norm)(hidden)
        logits = self.get_submodule(self.facts.lm_head)(hidden)
        return logits if self.facts.logits_hook is None else self.facts.logits_hook(logits, self.config)


_PART_CLASSES = {"head": HeadPart, "trunk": TrunkPart, "tail": TailPart}
