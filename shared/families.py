"""Per-family facts for splitting a decoder-only causal LM.

One table instead of one `if` per family in the code path: every place that needs to know where
a family keeps its embeddings, blocks, final norm or rotary module reads it from here.
Paths are dotted module paths in the full Hugging Face model (`AutoModelForCausalLM`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

FAMILIES: dict[str, FamilyFacts] = {
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, name="mistral", uniform_sliding_window=True),
    "qwen2": replace(_LLAMA, name="qwen2"),
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
