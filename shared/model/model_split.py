"""Split a causal LM into head (silo), trunk (trunk worker) and tail (silo).

Each part is a container tree that mirrors the full model's module paths, with the blocks in an
nn.ModuleDict keyed by their ORIGINAL index ("5", not "0"). Parameter names are therefore those of
the full model ("model.layers.5.self_attn.q_proj.weight"): weights load by name from the checkpoint
and adapter state dicts map 1:1 onto the unsplit model.

Only the 2-D padding mask and the position ids cross the wire; every part rebuilds its own causal
(and sliding-window) mask and its own rotary embeddings from them.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from shared.model.adapters import prefix_cache, prefix_len, with_prefix
from shared.model.families import FamilyFacts, facts_for

# transformers 5.24 renamed the KV cache argument of the mask builders and of the decoder layers and
# models from past_key_values to cache (the old name warns at every call and goes in 5.40); earlier
# 5.x releases know only the old name. One release renames all of them together.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

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
        mask_kwargs[CACHE_ARG] = cache
        # Always a 2-D mask, never None: with mask None and no cache, HF reads repeated position ids
        # (right padding from positions_from_mask) as packed sequences and builds a different mask.
        # Under SDPA it returns None when nothing is padded (plain is_causal): that is correct.
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in self._types.values():
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        layer_kwargs = {"position_ids": position_ids, CACHE_ARG: cache}
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


# ---- loading ---------------------------------------------------------------------------------


def load_config(model_dir: str | Path) -> PreTrainedConfig:
    """The model's config with every dropout set to 0 (split == unsplit needs it), family checked."""
    config = AutoConfig.from_pretrained(model_dir)
    facts_for(config)
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def _dropout_off(module: nn.Module) -> None:
    # Config dropouts are already 0; this catches modules built with a hard-coded rate.
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _checkpoint_index(model_dir: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file, from the shard index or the files' headers."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / f for k, f in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            out.update({k: f for k in st.keys()})
    return out


def _load_owned(part: _Part, model_dir: Path, dtype: torch.dtype, device, on_layer_loaded=None,
                given: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Read exactly the part's tensors from the checkpoint and assign them (part is on meta).

    One block at a time: ``on_layer_loaded(block)`` runs as soon as a block's weights are in (the
    trunk quantizes it there), so at most one block is ever held in the compute dtype besides the rest.
    ``given``: tensors the caller already holds (the silo's tied embedding for the tail's LM head),
    assigned as they are instead of read again.
    """
    facts = part.facts
    where = _checkpoint_index(model_dir)
    files: dict[Path, object] = {}
    read_keys: set[str] = set()

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise KeyError(f"{key!r} not found in the checkpoint at {model_dir}")
        if where[key] not in files:
            files[where[key]] = safe_open(where[key], framework="pt", device=str(device))
        read_keys.add(key)
        return files[where[key]].get_tensor(key)

    groups: dict[int | None, list[str]] = {}
    layers_prefix = f"{facts.layers}."
    given = given or {}
    if given:
        part.load_state_dict(given, strict=False, assign=True)
    for name in part.state_dict():
        if name in given:
            continue
        index = int(name[len(layers_prefix):].split(".")[0]) if name.startswith(layers_prefix) else None
        groups.setdefault(index, []).append(name)
    for index, names in groups.items():
        part.load_state_dict(_read_tensors(names, part, read, where, dtype), strict=False, assign=True)
        if index is not None and on_layer_loaded is not None:
            on_layer_loaded(part.get_submodule(f"{facts.layers}.{index}"))
    return sorted(read_keys)


def _read_tensors(names: list[str], part: _Part, read, where: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    facts, config = part.facts, part.config
    sd = {}
    for name in names:
        key = name
        if key not in where and name == f"{facts.lm_head}.weight" and config.tie_word_embeddings:
            # measured: save_pretrained (5.23) writes only the embedding when weights are tied
            key = f"{facts.embed}.weight"
        t = None
        if key not in where and facts.load_hook is not None:
            t = facts.load_hook(name, read, config)  # a family whose checkpoint layout differs (MoE)
        if t is None:
            t = read(key)
        sd[name] = t.to(dtype) if t.is_floating_point() else t
    return sd


def attention_for(config: PreTrainedConfig, requested: str) -> str:
    """The attention implementation to build with: the family's own when it has no SDPA kernel."""
    return facts_for(config).attn_implementation or requested


def _skeleton(config: PreTrainedConfig, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    # Parameters on meta: no memory, no init work; only the modules a part owns get real weights
    # later. Buffers are real: computed ones (rotary inv_freq, Gemma's embedding scale) are not in
    # the checkpoint, and a meta copy would fail or read garbage.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                attn_implementation=attention_for(config, attn_implementation))


def build_part(
    model_dir: str | Path,
    part: str,
    head_layers: int = 1,
    tail_layers: int = 1,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    on_layer_loaded=None,
    given: dict[str, torch.Tensor] | None = None,
) -> _Part:
    """Build one part and load only its weights. `part.loaded_keys` lists the checkpoint keys read.

    ``on_layer_loaded(block)``, if given, runs on each decoder block as soon as its weights are in;
    ``given`` maps parameter names to tensors already loaded (not read again).
    """
    if part not in _PART_CLASSES:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    plan = SplitPlan(config.num_hidden_layers, head_layers, tail_layers)
    full = _skeleton(config, dtype, attn_implementation)
    facts = facts_for(config)
    layers = full.get_submodule(facts.layers)

    out = _PART_CLASSES[part](full.config, plan.range_of(part))
    if part == "head":
        for path in (facts.embed, facts.pos_embed, facts.embed_dropout):
            if path:
                _attach(out, path, full.get_submodule(path))
    _attach(out, facts.layers, nn.ModuleDict({str(i): layers[i] for i in out.layer_ids}))
    if part == "tail":
        _attach(out, facts.final_norm, full.get_submodule(facts.final_norm))
        _attach(out, facts.lm_head, full.get_submodule(facts.lm_head))
    if facts.rotary:  # no parameters: every part keeps its own copy
        _attach(out, facts.rotary, full.get_submodule(facts.rotary))
    out.loaded_keys = _load_owned(out, model_dir, dtype, device, on_layer_loaded, given)
    out.to(device)  # the computed buffers (the weights are already there)
    _dropout_off(out)
    left_on_meta = [n for n, t in [*out.named_parameters(), *out.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{part}: tensors never materialised: {left_on_meta[:5]}")
    return out


def build_silo_parts(
    model_dir: str | Path,
    head_layers: int = 1,
    tail_layers: int = 1,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[HeadPart, TailPart]:
    """Head and tail for a silo; with tied embeddings the LM head IS the embedding Parameter.

    One Parameter means its gradients from both ends add up, exactly as in the unsplit model.
    """
    kw = dict(dtype=dtype, attn_implementation=attn_implementation, device=device)
    head = build_part(model_dir, "head", head_layers, tail_layers, **kw)
    facts = head.facts
    tied = head.config.tie_word_embeddings
    # Tied: the tail's LM head is assigned the head's embedding Parameter itself, never loaded
    # (measured: a separate copy cost 1 GB of load peak on a 1B Llama in fp32, only to be replaced)
    given = {f"{facts.lm_head}.weight": head.get_submodule(facts.embed).weight} if tied else None
    tail = build_part(model_dir, "tail", head_layers, tail_layers, **kw, given=given)
    return head, tail


def build_full_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> nn.Module:
    """The plain unsplit model (dropout off), for references and centralized checks."""
    config = load_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=dtype, attn_implementation=attention_for(config, attn_implementation)
    )
    _dropout_off(model)
    return model


# ---- tiny models for tests -------------------------------------------------------------------


def _tiny_config(family: str, hidden_size: int, num_layers: int, vocab_size: int, **overrides):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, initializer_range=0.1)
    rotary = dict(common, intermediate_size=2 * hidden_size, num_key_value_heads=2,
                  max_position_embeddings=128)
    if family == "llama":  # tied embeddings, like SmolLM2
        kw, cls = dict(rotary, tie_word_embeddings=True), LlamaConfig
    elif family == "qwen2":  # upper half of the layers use a 4-token sliding window
        kw = dict(rotary, use_sliding_window=True, sliding_window=4, max_window_layers=num_layers // 2)
        cls = Qwen2Config
    elif family == "mistral":  # every layer slides (Mistral has no layer_types)
        kw, cls = dict(rotary, sliding_window=4), MistralConfig
    elif family == "gpt2":
        # GPT2Config's defaults point bos/eos at 50256, outside a tiny vocabulary
        special = dict(bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
        kw = dict(common, max_position_embeddings=128, **special)
        cls = GPT2Config
    elif family in _TINY_EXTRAS:
        from transformers import AutoConfig

        # token ids inside the tiny vocabulary (several families default to ids above 100k)
        kw = dict(rotary, head_dim=hidden_size // 4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  **_TINY_EXTRAS[family])
        kw.update(overrides)
        return AutoConfig.for_model(family, **kw)
    else:
        raise ValueError(f"no tiny config for family {family!r}")
    kw.update(overrides)
    return cls(**kw)


# What makes each family's tiny model exercise its own features (MoE routing with 4 experts,
# sliding windows that cut a 12-token batch, soft-capping that bites, Granite's multipliers).
_TINY_EXTRAS: dict[str, dict] = {
    "qwen3": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "phi3": {},
    "olmo2": {},
    "smollm3": {},  # no rotary in every 4th layer (the config's default no_rope_layers)
    "glm4": {},  # partial rotary (half of each head)
    "granite": dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.1),
    "gemma2": dict(sliding_window=4, final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
                   query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                        final_logit_softcapping=3.0, rope_local_base_freq=100.0, query_pre_attn_scalar=16),
}


def make_tiny_model_dir(
    path: str | Path,
    family: str = "llama",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    vocab_size: int = 260,
    **overrides,
) -> Path:
    """Save a tiny random model (config.json + model.safetensors) with a seeded init."""
    path = Path(path)
    config = _tiny_config(family, hidden_size, num_layers, vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path
