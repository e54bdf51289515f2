"""Load one part of a split model: exactly its own weights from the checkpoint, nothing else.

Each role builds its part on the meta device and reads only the tensors that part owns (safetensors,
lazily, one block at a time): the trunk never holds the embeddings or the LM head, a silo never
materialises the trunk. Dropout is off everywhere (split == unsplit needs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from shared.model.families import facts_for
from shared.model.model_split import _PART_CLASSES, PARTS, HeadPart, SplitPlan, TailPart, _attach, _Part


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



