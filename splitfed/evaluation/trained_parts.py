"""A model to evaluate, as head, trunk and tail parts in one process, with a trained adapter loaded.

Whatever trained it (a split run's silo + trunk files, centralized training, an exported PEFT
directory), an adapter is one state dict named by full parameter names. Each part takes the names
it owns, so one code path evaluates every source, and the split point does not matter: split and
unsplit compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shared.model.adapter_files import AdapterFileError
from shared.model.adapters import AdapterConfig, apply_adapter, load_adapter_state_dict
from shared.model.model_split import HeadPart, TailPart, TrunkPart
from shared.model.part_loading import build_part, build_silo_parts


@dataclass
class SplitModel:
    head: HeadPart
    trunk: TrunkPart
    tail: TailPart

    def eval(self) -> SplitModel:
        for part in (self.head, self.trunk, self.tail):
            part.eval()
        return self

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        h1 = self.head(input_ids, attention_mask, position_ids)
        return self.tail(self.trunk(h1, attention_mask, position_ids), attention_mask, position_ids)


def _trainable_names(part) -> set[str]:
    return {n for n, p in part.named_parameters(remove_duplicate=False) if p.requires_grad}


def load_split_model(model_dir: Path, cfg: AdapterConfig | None = None,
                     state: dict[str, torch.Tensor] | None = None) -> SplitModel:
    """The base model split in three; with ``cfg`` and ``state``, that adapter loaded into the parts."""
    head, tail = build_silo_parts(model_dir)
    trunk = build_part(model_dir, "trunk")
    model = SplitModel(head, trunk, tail)
    if cfg is None:
        return model.eval()
    if state is None:
        raise ValueError("an adapter config without adapter tensors")
    left = dict(state)
    for part in (head, trunk, tail):
        apply_adapter(part, cfg, seed=0)  # initial values are overwritten below
        names = _trainable_names(part)
        try:
            load_adapter_state_dict(part, {k: state[k] for k in names if k in state})
        except (KeyError, ValueError) as exc:
            raise AdapterFileError(f"the adapter does not fit the model with {cfg.kind} settings "
                                   f"(r={cfg.lora_r}, prefix_len={cfg.prefix_len}): {exc}") from None
        for k in names:
            left.pop(k, None)
    if left:
        raise AdapterFileError(f"adapter tensors the model has no place for: {sorted(left)[:3]}")
    return model.eval()
