"""One tensor to and from its raw payload bytes: no pickle, no torch.load.

A tensor is rebuilt only from (dtype code, shape, raw bytes). Sending is zero-copy from the
tensor's own memory when it is already contiguous on the CPU; receiving gives a ``torch.frombuffer``
view of the received bytes (read-only: see ``Message``), or, for a chunked payload, of one buffer
the chunks were joined into (shared/wire/chunks.py).
"""

from __future__ import annotations

import re
import warnings

import torch

from shared.wire.chunks import Chunks, join_chunks
from shared.wire.header import FrameError, TensorDesc
from shared.wire.protocol import TORCH_DTYPE, WIRE_DTYPE


def tensor_to_wire(tensor: torch.Tensor) -> tuple[TensorDesc, memoryview]:
    """Describe a tensor and expose its bytes without copying (when already contiguous on CPU)."""
    if tensor.dtype not in WIRE_DTYPE:
        raise ValueError(f"dtype {tensor.dtype} cannot travel on the wire")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    desc = TensorDesc(WIRE_DTYPE[t.dtype], tuple(t.shape))
    if t.numel() == 0:
        return desc, memoryview(b"")
    # numpy has no bfloat16 (nor float8): view the same memory as raw bytes (keeps the tensor alive via .base).
    raw = t.reshape(-1).view(torch.uint8).numpy()
    return desc, memoryview(raw)


# Received buffers can be read-only; we never write into them (see Message docstring). Silenced
# here once, for this module only: a catch_warnings() per tensor would reset every module's
# "warn once" memory each step, so unrelated warnings would repeat in the logs at every step.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=re.escape(__name__) + "$")


def tensor_from_wire(desc: TensorDesc, buf) -> torch.Tensor:
    """Rebuild a tensor from its description and raw bytes (one buffer, or the ``Chunks`` of a
    chunked payload, joined here into one new buffer). The length must match exactly."""
    if isinstance(buf, Chunks):
        try:
            buf = join_chunks(desc.nbytes, desc.chunk_shift, buf)
        except ValueError as exc:
            raise FrameError("size_mismatch", str(exc)) from None
    view = memoryview(buf)
    if view.nbytes != desc.nbytes:
        raise FrameError("size_mismatch", f"payload {view.nbytes} bytes, header says {desc.nbytes}")
    dtype = TORCH_DTYPE[desc.dtype]
    if desc.nbytes == 0:
        return torch.empty(desc.shape, dtype=dtype)
    flat = torch.frombuffer(view, dtype=dtype)  # may be read-only: see the filter above
    return flat.view(desc.shape)
