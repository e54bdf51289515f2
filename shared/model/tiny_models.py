"""Tiny models built from a config, for tests and the 'tiny' preset: no download, random weights.

One small config per family, with that family's own features switched on (tied embeddings,
sliding windows, ...), saved as safetensors so every role loads it the way it loads a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


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
