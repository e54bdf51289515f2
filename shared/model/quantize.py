"""A quantized frozen base for the trunk (QLoRA): every nn.Linear of its blocks in NF4 or int8.

bitsandbytes does the quantization and the kernels; this module only swaps the trunk's loaded
nn.Linear modules for bitsandbytes' Linear4bit / Linear8bitLt holding the same weights, before the
adapter goes on (peft wraps a quantized linear like any other: the LoRA matrices stay fp32 master
weights, see shared/model/adapters.py). The base is frozen by construction: a quantized weight has no
gradient, so "full" fine-tuning is refused.

Measured with bitsandbytes 0.50.2 on this CPU-only stack: its CPU backend really runs both kinds,
forward and backward to the input (a 256x512 random linear: NF4 relative output error 0.09, int8
0.004; LoRA on top trains). So the CPU path is not refused; on CUDA the same code uses the CUDA kernels.
MoE experts stored as fused 3-D tensors (Mixtral, Qwen3-MoE in transformers 5) are not nn.Linear
and stay in the compute dtype; their attention and routers are quantized.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata

import torch
from torch import nn

QUANT_KINDS = ("none", "nf4", "int8")
MIN_BITSANDBYTES = (0, 46)  # the first release with a CPU backend for both kinds


class QuantizationUnavailable(ValueError):
    """The chosen quantization cannot run here; the message says why and what to do."""


def _bitsandbytes():
    try:
        version = importlib.metadata.version("bitsandbytes")
        import bitsandbytes
    except (importlib.metadata.PackageNotFoundError, ImportError) as exc:
        raise QuantizationUnavailable(f"--trunk-quant needs bitsandbytes ({exc}): pip install 'splitfed[quant]' "
                                      "(ops/install.sh installs it)") from None
    if tuple(int(p) for p in version.split(".")[:2]) < MIN_BITSANDBYTES:
        raise QuantizationUnavailable(f"bitsandbytes {version} is too old for a CPU trunk: "
                                      f">= {'.'.join(map(str, MIN_BITSANDBYTES))} needed")
    return bitsandbytes


def quantize_linears(module: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every nn.Linear under ``module`` by its quantized twin (same weights); return how many.

    Call it after the weights are loaded and before the adapter is applied.
    """
    if kind == "none":
        return 0
    if kind not in QUANT_KINDS:
        raise QuantizationUnavailable(f"unknown quantization {kind!r}: one of {', '.join(QUANT_KINDS)}")
    bnb = _bitsandbytes()
    targets = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, _quantized(bnb, linear, kind, compute_dtype, device))
    return len(targets)


def block_quantizer(kind: str, compute_dtype: torch.dtype, device: torch.device):
    """An ``on_layer_loaded`` hook for build_part: each block quantized as soon as it is loaded, so the
    trunk never holds its whole base in the compute dtype (None for "none")."""
    if kind == "none":
        return None
    _bitsandbytes()  # fail before any weight is read

    def quantize_block(block: nn.Module) -> None:
        quantize_linears(block, kind, compute_dtype, device)

    return quantize_block


def release_freed_heap() -> None:
    """Hand the heap freed while quantizing back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Each block is loaded in the compute dtype and freed once quantized; glibc keeps such freed
    blocks for reuse, so without this a 4-bit trunk kept about 190 MB more resident (SmolLM2,
    measured) than its weights need.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _quantized(bnb, linear: nn.Linear, kind: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    weight = linear.weight.data.to("cpu")  # bitsandbytes quantizes from the CPU copy as it moves it
    bias = linear.bias is not None
    if kind == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              quant_type="nf4", device="cpu")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:  # int8: LLM.int8() with the weights kept in int8 (no fp16 copy)
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                device="cpu")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes when the weight moves to its device


def weight_bytes(*modules: nn.Module) -> int:
    """Bytes of the modules' parameters and buffers as stored (a tensor shared by two, such as a tied
    embedding, once; quantized weights at their packed size, with their scales)."""
    tensors = {id(t): t for module in modules for t in [*module.parameters(), *module.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for m in {id(m): m for module in modules for m in module.modules()}.values():  # NF4's absmax scales
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total
