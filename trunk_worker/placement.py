"""A trunk worker over several devices of one host: contiguous spans of its blocks, one per device.

Each block's weights go to its device with torch's own ``.to``, and accelerate's AlignDevicesHook
on each block (the hook ``dispatch_model`` uses) moves the activations (hidden state, mask, rotary
embeddings) there as they arrive; the trunk's output comes back on the first device, where its inputs arrived. No pipeline
of our own: one step still runs block after block, the devices take turns (it buys memory, not
speed; pipelining micro-batches across the devices is a later step).
"""

from __future__ import annotations

import torch
from torch import nn


class PlacementError(ValueError):
    """The requested devices cannot hold this trunk; the message says why."""


def parse_devices(spec: str) -> list[torch.device]:
    """'cuda:0,cuda:1' -> devices, each checked to exist on this host."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise PlacementError("--devices is empty: give e.g. cuda:0,cuda:1")
    devices = []
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise PlacementError(f"--devices: {name!r} is not a torch device ({exc})") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise PlacementError(f"--devices: {name} asked for, but this host has no CUDA device")
            if device.index is None:
                raise PlacementError(f"--devices: name each GPU with its index ({name}:0, {name}:1, ...)")
            if device.index >= torch.cuda.device_count():
                raise PlacementError(f"--devices: {name} asked for, this host has {torch.cuda.device_count()} GPUs")
        devices.append(device)
    return devices


def block_spans(layer_ids: list[int], n_devices: int) -> list[list[int]]:
    """The blocks split into ``n_devices`` contiguous spans as even as they can be (earlier ones
    take the remainder)."""
    if n_devices > len(layer_ids):
        raise PlacementError(f"{n_devices} devices for {len(layer_ids)} trunk blocks: at most one device per block")
    size, extra = divmod(len(layer_ids), n_devices)
    spans, start = [], 0
    for i in range(n_devices):
        end = start + size + (1 if i < extra else 0)
        spans.append(layer_ids[start:end])
        start = end
    return spans


def spread_over_devices(trunk: nn.Module, devices: list[torch.device]) -> dict[str, str]:
    """Place the trunk's blocks on ``devices`` (contiguous spans); returns the placement by module.

    accelerate's AlignDevicesHook on each block moves its inputs to the block's device (what
    dispatch_model attaches for a block on a GPU; dispatch_model itself would treat a "cpu" entry
    as offloaded weights, so the hooks are attached directly: the same path on any device).
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    facts = trunk.facts
    placed = {}
    for device, span in zip(devices, block_spans(trunk.layer_ids, len(devices))):
        for i in span:
            name = f"{facts.layers}.{i}"
            block = trunk.get_submodule(name).to(device)
            add_hook_to_module(block, AlignDevicesHook(execution_device=device))
            placed[name] = str(device)
    for name in _unmapped_modules(trunk, placed):
        trunk.get_submodule(name).to(devices[0])  # the rotary embedding and the like: with the input
        placed[name] = str(devices[0])
    # the output comes back to the device the input came from
    add_hook_to_module(trunk, AlignDevicesHook(io_same_device=True))
    return placed


def _unmapped_modules(trunk: nn.Module, placed: dict[str, str]) -> list[str]:
    """Top-most modules holding parameters or buffers that no placement covers."""
    covered = lambda n: any(n == k or n.startswith(k + ".") for k in placed)  # noqa: E731
    out = []
    for name, _ in [*trunk.named_parameters(), *trunk.named_buffers()]:
        module = name.rsplit(".", 1)[0]
        if not covered(module) and not any(module == o or module.startswith(o + ".") for o in out):
            out.append(module)
    return out
