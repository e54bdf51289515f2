"""The trunk's frozen base: its middle blocks, in the compute dtype or quantized (QLoRA)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from shared.model_split import build_part
from shared.protocol import WIRE_DTYPE_BY_NAME
from shared.quantize import block_quantizer, release_freed_heap, weight_bytes
from shared.settings import TrunkSettings

log = logging.getLogger("trunk")


def load_trunk_base(model_dir: Path, settings: TrunkSettings, device: torch.device) -> nn.Module:
    """Build the trunk part; with --trunk-quant each block is quantized as soon as it is loaded, so
    the base is never whole in the compute dtype."""
    if settings.trunk_quant != "none" and settings.adapter == "full":
        raise ValueError(f"--trunk-quant {settings.trunk_quant} freezes the trunk's base: "
                         "use --adapter lora or prefix")
    dtype = WIRE_DTYPE_BY_NAME[settings.dtype]
    trunk = build_part(model_dir, "trunk", settings.head_layers, settings.tail_layers, dtype=dtype, device=device,
                       on_layer_loaded=block_quantizer(settings.trunk_quant, dtype, device))
    if settings.trunk_quant != "none":
        release_freed_heap()
        n = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in trunk.modules())
        log.info("trunk base quantized to %s: %d linear layers, %.1f MB", settings.trunk_quant, n,
                 weight_bytes(trunk) / 2**20)
    return trunk
