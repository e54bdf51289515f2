"""The trunk's frozen base: its middle blocks, in the compute dtype or quantized (QLoRA), on one
device or spread over several (trunk_worker/placement.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from shared.model.part_loading import build_part
from shared.wire.protocol import WIRE_DTYPE_BY_NAME
from shared.model.quantize import block_quantizer, release_freed_heap, weight_bytes
from shared.runtime.settings import TrunkSettings
from trunk_worker.placement import PlacementError, parse_devices, spread_over_devices

log = logging.getLogger("trunk")


def load_trunk_base(model_dir: Path, settings: TrunkSettings) -> tuple[nn.Module, torch.device]:
    """Build the trunk part; returns it and the device its inputs go to (its first block's).

    With --trunk-quant each block is quantized as soon as it is loaded, so the base is never whole
    in the compute dtype. With --devices the blocks load on the CPU and then go to their devices."""
    if settings.trunk_quant != "none" and settings.adapter == "full":
        raise ValueError(f"--trunk-quant {settings.trunk_quant} freezes the trunk's base: "
                         "use --adapter lora or prefix")
    devices = parse_devices(settings.devices) if settings.devices else [torch.device(settings.device)]
    if len(devices) > 1 and settings.trunk_quant != "none":
        # bitsandbytes quantizes as a weight moves to its device: each block would have to be
        # quantized on its own GPU, a path no GPU has checked yet
        raise PlacementError("--devices with --trunk-quant is not supported yet: quantize on one device")
    dtype = WIRE_DTYPE_BY_NAME[settings.dtype]
    load_on = devices[0] if len(devices) == 1 else torch.device("cpu")
    trunk = build_part(model_dir, "trunk", settings.head_layers, settings.tail_layers, dtype=dtype, device=load_on,
                       on_layer_loaded=block_quantizer(settings.trunk_quant, dtype, load_on))
    if settings.trunk_quant != "none":
        release_freed_heap()
        n = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in trunk.modules())
        log.info("trunk base quantized to %s: %d linear layers, %.1f MB", settings.trunk_quant, n,
                 weight_bytes(trunk) / 2**20)
    if len(devices) > 1:
        placed = spread_over_devices(trunk, devices)
        spans = {}
        for name, device in placed.items():
            if name.startswith(f"{trunk.facts.layers}."):
                spans.setdefault(device, []).append(int(name.rsplit(".", 1)[1]))
        log.info("trunk blocks over %d devices: %s", len(devices),
                 ", ".join(f"{d} {min(b)}-{max(b)}" for d, b in spans.items()))
    return trunk, devices[0]
