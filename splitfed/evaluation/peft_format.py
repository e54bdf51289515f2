"""LoRA adapters in PEFT's own directory format, both ways.

splitfed names adapter tensors by the full model's parameter names as peft's inject_adapter_in_model
makes them (``model.layers.3.self_attn.q_proj.lora_A.default.weight``); a saved PEFT adapter drops
the adapter name and sits under the PeftModel wrapper
(``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``). A directory holds
``adapter_config.json`` (a peft LoraConfig) and ``adapter_model.safetensors``; plain transformers +
``PeftModel.from_pretrained(base, dir)`` loads it. Reading one back runs no code: JSON + safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig

from shared.model.adapter_files import AdapterFileError, load_adapter_file, save_adapter_file
from shared.model.adapters import AdapterConfig

PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_OURS = re.compile(rf"\.(lora_[AB])\.{ADAPTER_NAME}\.weight$")
_PEFTS = re.compile(r"\.(lora_[AB])\.weight$")


class PeftFormatError(AdapterFileError):
    pass


def to_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if not _OURS.search(name):
            raise PeftFormatError(f"{name!r} is not a LoRA tensor: only LoRA adapters export to PEFT")
        out[PEFT_PREFIX + _OURS.sub(r".\1.weight", name)] = tensor
    return out


def from_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if not name.startswith(PEFT_PREFIX) or not _PEFTS.search(name):
            raise PeftFormatError(f"{name!r} is not a PEFT LoRA tensor name")
        out[_PEFTS.sub(rf".\1.{ADAPTER_NAME}.weight", name[len(PEFT_PREFIX):])] = tensor
    return out


def target_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The module names LoRA wraps (``q_proj``...), from the tensor names."""
    return sorted({_OURS.sub("", n).rsplit(".", 1)[-1] for n in state if _OURS.search(n)})


def lora_config(cfg: AdapterConfig, targets: list[str], base_model: str, fan_in_fan_out: bool) -> LoraConfig:
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM", inference_mode=True,
                      base_model_name_or_path=base_model)


def save_peft_adapter(out_dir: Path, state: dict[str, torch.Tensor], cfg: AdapterConfig, base_model: str,
                      fan_in_fan_out: bool = False) -> None:
    if cfg.kind != "lora":
        raise PeftFormatError(f"only LoRA adapters export to the PEFT format (this run trained {cfg.kind})")
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_config(cfg, target_modules(state), base_model, fan_in_fan_out).save_pretrained(str(out_dir))
    save_adapter_file(out_dir / WEIGHTS_FILE, to_peft_names(state), metadata={"format": "pt"})


def load_peft_adapter(peft_dir: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(our AdapterConfig, tensors by our names) of a PEFT LoRA directory."""
    peft_dir = Path(peft_dir)
    try:
        config = json.loads((peft_dir / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise PeftFormatError(f"{peft_dir}: no {CONFIG_FILE} (not a PEFT adapter directory)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PeftFormatError(f"{peft_dir / CONFIG_FILE}: unreadable ({exc})") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise PeftFormatError(f"{peft_dir}: only plain LoRA adapters are supported "
                              f"(peft_type={config.get('peft_type')}, dora={config.get('use_dora')})")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise PeftFormatError(f"{peft_dir}: target_modules must be a list of module names, got {targets!r}")
    tensors, _ = load_adapter_file(peft_dir / WEIGHTS_FILE)
    cfg = AdapterConfig(kind="lora", lora_r=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                        target_modules=tuple(targets))
    return cfg, from_peft_names(tensors)
