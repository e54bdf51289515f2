"""Per-family facts for splitting a decoder-only causal LM.

One table instead of one `if` per family in the code path: every place that needs to know where
a family keeps its embeddings, blocks, final norm or rotary module reads it from here.
Paths are dotted module paths in the full Hugging Face model (`AutoModelForCausalLM`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedConfig


@dataclass(frozen=True)
class FamilyFacts:
    name: str
    embed: str  # token embedding (nn.Embedding)
    pos_embed: str | None  # learned absolute positions (GPT-2 wpe); None for rotary families
    embed_dropout: str | None  # dropout right after the embeddings (GPT-2 drop)
    layers: str  # the nn.ModuleList of decoder blocks
    final_norm: str
    lm_head: str
    rotary: str | None  # rotary module (no parameters: every part keeps its own copy)
    lora_targets: tuple[str, ...]  # default LoRA target modules (peft suffix match)
    # GPT-2 keeps its projections as Conv1D (weight stored [in, out]); peft must know.
    lora_fan_in_fan_out: bool = False
    # Mistral has no `layer_types`: its model uses the sliding mask on every layer whenever
    # `config.sliding_window` is set. Qwen2 (and newer configs) spell it out in `layer_types`.
    uniform_sliding_window: bool = False
    # What a family's model does outside its blocks, which the head and tail must do too (hooks
    # named here, never an `if family ==` in the code path):
    embed_scale: Callable[[PreTrainedConfig], float] | None = None  # multiplies the embeddings (Granite)
    logits_hook: Callable[[torch.Tensor, PreTrainedConfig], torch.Tensor] | None = None  # after lm_head
    # Gemma 3: one rotary module, called per layer type (local and global layers, other bases).
    rotary_per_layer_type: bool = False
    # Gemma 2's attention softcapping has no SDPA kernel: the family runs eager attention.
    attn_implementation: str | None = None
    # A parameter whose checkpoint layout differs from the module's: (name, read, config) -> tensor,
    # or None when the name is stored as is. read(key) reads one checkpoint tensor.
    load_hook: Callable | None = None

    def layer_types(self, config: PreTrainedConfig) -> list[str]:
        """Attention type of every layer: "full_attention" or "sliding_attention"."""
        n = config.num_hidden_layers
        types = getattr(config, "layer_types", None)
        if types:
            return list(types)
        if self.uniform_sliding_window and getattr(config, "sliding_window", None) is not None:
            return ["sliding_attention"] * n
        return ["full_attention"] * n

    def kv_shape(self, config: PreTrainedConfig) -> tuple[int, int]:
        """(num key/value heads, head dim): the shape of one layer's K/V per token (prefix tuning).

        GPT2Config maps num_attention_heads/hidden_size onto n_head/n_embd, so one rule serves all.
        """
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return kv_heads, head_dim

    def owner_of(self, param_name: str) -> str | int:
        """Which piece of the model a full parameter name belongs to: a layer index, "embed" or "top".

        "embed" = embeddings (head side), "top" = final norm + LM head (tail side).
        """
        layers_prefix = self.layers + "."
        if param_name.startswith(layers_prefix):
            return int(param_name[len(layers_prefix) :].split(".", 1)[0])
        for path in (self.embed, self.pos_embed):
            if path and param_name.startswith(path + "."):
                return "embed"
        for path in (self.final_norm, self.lm_head):
            if param_name.startswith(path + "."):
                return "top"
        raise ValueError(f"parameter {param_name!r} belongs to no known part of a {self.name} model")


_LLAMA = FamilyFacts(
    name="llama",
    embed="model.embed_tokens",
    pos_embed=None,
    embed_dropout=None,
    layers="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    rotary="model.rotary_emb",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
)

_GPT2 = FamilyFacts(
    name="gpt2",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    embed_dropout="transformer.drop",
    layers="transformer.h",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    rotary=None,
    # attention only, like the Llama default: fused QKV and the attention output projection
    # ("attn.c_proj" so that the MLP's c_proj is left alone).
    lora_targets=("c_attn", "attn.c_proj"),
    lora_fan_in_fan_out=True,
)

def _granite_embed_scale(config: PreTrainedConfig) -> float:
    return config.embedding_multiplier  # GraniteModel: inputs_embeds * embedding_multiplier


def _granite_logits(logits: torch.Tensor, config: PreTrainedConfig) -> torch.Tensor:
    return logits / config.logits_scaling  # GraniteForCausalLM


def _softcap_logits(logits: torch.Tensor, config: PreTrainedConfig) -> torch.Tensor:
    """Gemma 2/3's final logit soft-capping: cap * tanh(logits / cap), as their ForCausalLM does."""
    cap = config.final_logit_softcapping
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _fused_experts(block: str, gate: str, up: str, down: str) -> Callable:
    """MoE blocks (transformers 5): in memory each layer has one fused tensor for all experts
    (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); checkpoints, and
    save_pretrained, keep one matrix per expert under ``{block}.experts.{e}``. Only the layers a
    part owns are read, so the trunk still never touches the silo's layers."""

    def load(name: str, read: Callable[[str], torch.Tensor], config: PreTrainedConfig) -> torch.Tensor | None:
        layer, sep, leaf = name.partition(".mlp.")
        if not sep:
            return None
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        if leaf == "gate.weight":
            return read(f"{layer}.{block}.gate.weight")
        if leaf == "experts.gate_up_proj":
            return torch.stack([torch.cat([read(f"{layer}.{block}.experts.{e}.{gate}.weight"),
                                           read(f"{layer}.{block}.experts.{e}.{up}.weight")]) for e in range(experts)])
        if leaf == "experts.down_proj":
            return torch.stack([read(f"{layer}.{block}.experts.{e}.{down}.weight") for e in range(experts)])
        return None

    return load


# Families whose model is the Llama layout (embed_tokens, layers, norm, rotary_emb, lm_head) with
# everything family-specific inside the blocks: Qwen3's q/k norms, OLMo 2's post-norms, SmolLM3's
# layers without rotary, GLM-4's partial rotary and sandwich norms, the MoE blocks of Mixtral and
# Qwen3-MoE (router in the block; its auxiliary loss is off unless config.output_router_logits),
# Gemma's sandwich norms, scaled embedding module and attention soft-capping.
_LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "smollm3", "glm4")

FAMILIES: dict[str, FamilyFacts] = {
    **{name: replace(_LLAMA, name=name) for name in _LLAMA_LAYOUT},
    "mistral": replace(_LLAMA, name="mistral", uniform_sliding_window=True),
    "mixtral": replace(_LLAMA, name="mixtral", load_hook=_fused_experts("block_sparse_moe", "w1", "w3", "w2")),
    "qwen3_moe": replace(_LLAMA, name="qwen3_moe", load_hook=_fused_experts("mlp", "gate_proj", "up_proj", "down_proj")),
    "phi3": replace(_LLAMA, name="phi3", lora_targets=("qkv_proj", "o_proj")),  # fused q/k/v
    "granite": replace(_LLAMA, name="granite", embed_scale=_granite_embed_scale, logits_hook=_granite_logits),
    "gemma2": replace(_LLAMA, name="gemma2", logits_hook=_softcap_logits, attn_implementation="eager"),
    "gemma3_text": replace(_LLAMA, name="gemma3_text", logits_hook=_softcap_logits, rotary_per_layer_type=True),
    "gpt2": _GPT2,
}


def facts_for(config: PreTrainedConfig) -> FamilyFacts:
    model_type = getattr(config, "model_type", None)
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None
