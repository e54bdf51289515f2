"""What trains is a setting: LoRA, prefix tuning (P-Tuning v2) or full fine-tuning.

The same `apply_adapter` works on a split part (head/trunk/tail) and on the unsplit model, and
initialises every adapter tensor from (seed, its full parameter name) alone. Because parts keep the
full model's parameter names, a part and the unsplit model get bit-identical adapters: that is
what makes split training comparable to centralized training tensor by tensor.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from peft import LoraConfig, inject_adapter_in_model
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import DynamicCache

from shared.model.families import facts_for

PREFIX_KEY = "prefix_key"
PREFIX_VALUE = "prefix_value"


class AdapterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["lora", "prefix", "full"] = "lora"
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = 16
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] | None = None  # None: the family's default (shared/model/families.py)
    # "zeros" is standard LoRA (the adapter starts as a no-op). "random" makes B non-zero so that
    # gradients reach A on the first step: tests use it to compare every gradient.
    lora_init_b: Literal["zeros", "random"] = "zeros"
    prefix_len: int = Field(4, ge=1)
    prefix_init_std: float = Field(0.02, gt=0.0)


def _generator(seed: int, name: str) -> torch.Generator:
    # Stable across processes and machines (python's hash() is salted per process).
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little"))


def _seeded_uniform(shape: torch.Size, bound: float, seed: int, name: str) -> torch.Tensor:
    # Drawn on the CPU in fp32, then copied: the same values whatever the device or dtype.
    return (torch.rand(shape, generator=_generator(seed, name)) * 2 - 1) * bound


def layers_by_index(module: nn.Module) -> dict[int, nn.Module]:
    """Decoder blocks by their original index, for a part (ModuleDict "5") or a full model (ModuleList)."""
    facts = facts_for(module.config)
    return {int(name): layer for name, layer in module.get_submodule(facts.layers).named_children()}


def apply_adapter(module: nn.Module, cfg: AdapterConfig, seed: int) -> list[nn.Parameter]:
    """Make `module` (a part or the full model) train what `cfg` says; return the trainable parameters.

    Everything else is frozen. Adapter tensors are initialised from (seed, full parameter name).
    """
    facts = facts_for(module.config)
    module.requires_grad_(False)
    compute_dtype = next(module.parameters()).dtype
    if cfg.kind == "full" and compute_dtype != torch.float32:
        raise ValueError(f"full fine-tuning in {compute_dtype} would keep AdamW's state and updates in that dtype "
                         "(no fp32 master weights): use --adapter lora or prefix, or --dtype fp32")
    if cfg.kind == "full":
        module.requires_grad_(True)
    elif cfg.kind == "lora":
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules or facts.lora_targets),
            fan_in_fan_out=facts.lora_fan_in_fan_out,
            bias="none",
        )
        inject_adapter_in_model(lora, module)
        module.requires_grad_(False)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if ".lora_A." in name or (".lora_B." in name and cfg.lora_init_b == "random"):
                    # kaiming_uniform(a=sqrt(5)) as peft does for A: bound 1/sqrt(fan_in)
                    p.copy_(_seeded_uniform(p.shape, 1 / math.sqrt(p.shape[1]), seed, name))
                elif ".lora_B." in name:
                    p.zero_()
                else:
                    continue
                # fp32 whatever the model's dtype: the adapter is its own master copy (AdamW state
                # and updates in fp32); peft casts the input to it and the output back.
                p.data = p.data.float()
                p.requires_grad_(True)
    elif cfg.kind == "prefix":
        kv_heads, head_dim = facts.kv_shape(module.config)
        ref = next(module.parameters())
        layers_prefix = facts.layers
        for idx, layer in layers_by_index(module).items():
            for attr in (PREFIX_KEY, PREFIX_VALUE):
                name = f"{layers_prefix}.{idx}.{attr}"
                init = torch.randn(kv_heads, cfg.prefix_len, head_dim, generator=_generator(seed, name))
                # fp32 master copy; prefix_cache casts it to the layer's dtype (autograd goes through)
                init = (init * cfg.prefix_init_std).to(device=ref.device, dtype=torch.float32)
                layer.register_parameter(attr, nn.Parameter(init))
    else:  # pragma: no cover - pydantic guards the literal
        raise ValueError(f"unknown adapter kind {cfg.kind!r}")
    return [p for p in module.parameters() if p.requires_grad]


def unique_parameters(*param_lists: list[nn.Parameter]) -> list[nn.Parameter]:
    """Concatenate parameter lists without repeats (a tied embedding is both head's and tail's)."""
    seen: set[int] = set()
    out = []
    for params in param_lists:
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by full parameter name (copies: later training does not change them)."""
    return {
        name: p.detach().clone()
        for name, p in module.named_parameters(remove_duplicate=False)
        if p.requires_grad
    }


def load_adapter_state_dict(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy `sd` into the trainable tensors of `module`; names and shapes must match exactly."""
    params = {n: p for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    missing, unexpected = sorted(params.keys() - sd.keys()), sorted(sd.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"adapter state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if sd[name].shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(sd[name].shape)} != {tuple(p.shape)}")
            p.copy_(sd[name])


# ---- prefix tuning at run time ---------------------------------------------------------------


def prefix_len(layers: dict[int, nn.Module]) -> int:
    """P of the prefix the given blocks carry (0 when they carry none)."""
    for layer in layers.values():
        key = getattr(layer, PREFIX_KEY, None)
        if key is not None:
            return key.shape[1]
    return 0


def prefix_cache(layers: dict[int, nn.Module], batch: int) -> DynamicCache:
    """A fresh cache holding each given block's prefix K/V at its original layer index.

    Fresh per forward: attention appends this step's K/V to it. A DynamicCache without config
    grows lazily, so layer indices below the first owned one exist but stay empty (length 0);
    masks must therefore be sized with `layer_idx=` an owned layer. Plain (full) cache layers on
    purpose, also for sliding-window layers: the sliding mask then hides prefix entries that fall
    out of the window exactly as it would hide ordinary past tokens, identically split or unsplit.
    """
    cache = DynamicCache()
    for idx in sorted(layers):
        layer = layers[idx]
        key, value = getattr(layer, PREFIX_KEY), getattr(layer, PREFIX_VALUE)
        dtype = next(p for n, p in layer.named_parameters() if n not in (PREFIX_KEY, PREFIX_VALUE)).dtype
        key, value = key.to(dtype), value.to(dtype)
        # [kv_heads, P, head_dim] -> [B, kv_heads, P, head_dim]
        cache.update(key.expand(batch, *key.shape), value.expand(batch, *value.shape), idx)
    return cache


def with_prefix(
    attention_mask: torch.Tensor, position_ids: torch.Tensor, p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D mask over P+T keys (prefix always visible) and the tokens' positions shifted by P.

    Every part applies this itself, so the wire still carries the plain mask and positions.
    """
    ones = attention_mask.new_ones(attention_mask.shape[0], p)
    return torch.cat([ones, attention_mask], dim=1), position_ids + p
