"""Per-kind schema: which tensors each kind carries and how their shapes agree (after any
quantized pair was expanded: shared/wire/compression.py)."""

from __future__ import annotations

import torch

from shared.wire.header import FrameError
from shared.wire.protocol import FLOAT_WIRE_DTYPES, MAX_HANDSHAKE_BYTES, WIRE_DTYPE, Kind

_HIDDEN = "hidden"


def check_schema(msg) -> None:
    """Each kind carries a fixed set of tensors; shapes must agree with each other."""
    kinds_with_hidden_only = (Kind.FORWARD_RESULT, Kind.BACKWARD, Kind.GENERATE_RESULT)
    t = msg.tensors
    if msg.kind in (Kind.FORWARD, Kind.GENERATE):
        # [hidden float (B,T,H), attention mask uint8 (B,T), position ids int32/int64 (B,T)]
        if len(t) != 3:
            raise FrameError("schema", f"{msg.kind.name} carries 3 tensors, got {len(t)}")
        _check_hidden(t[0])
        b, s = t[0].shape[:2]
        if t[1].dtype != torch.uint8 or tuple(t[1].shape) != (b, s):
            raise FrameError("schema", f"mask must be uint8 [{b},{s}], got {t[1].dtype} {tuple(t[1].shape)}")
        if t[2].dtype not in (torch.int32, torch.int64) or tuple(t[2].shape) != (b, s):
            raise FrameError("schema", f"positions must be int [{b},{s}], got {t[2].dtype} {tuple(t[2].shape)}")
    elif msg.kind == Kind.BACKWARD_RESULT:
        if len(t) != 2:
            raise FrameError("schema", f"BACKWARD_RESULT carries 2 tensors, got {len(t)}")
        _check_hidden(t[0])
        if t[1].dtype != torch.int64 or tuple(t[1].shape) not in ((1,), (2,)):
            raise FrameError("schema", f"counters must be int64 [1] or [2], got {t[1].dtype} {tuple(t[1].shape)}")
    elif msg.kind == Kind.READY and t:  # a silo's READY may carry its signed registration token
        if len(t) != 1 or t[0].dtype != torch.uint8 or t[0].dim() != 1 or not 0 < t[0].numel() <= MAX_HANDSHAKE_BYTES:
            raise FrameError("schema", f"READY carries at most one uint8 vector of at most {MAX_HANDSHAKE_BYTES} bytes")
    elif msg.kind in (Kind.HELLO, Kind.HELLO_ACK):
        if len(t) != 1 or t[0].dtype != torch.uint8 or t[0].dim() != 1 or not 0 < t[0].numel() <= MAX_HANDSHAKE_BYTES:
            raise FrameError("schema", f"{msg.kind.name} carries one uint8 vector of at most {MAX_HANDSHAKE_BYTES} bytes")
    elif msg.kind in (Kind.AGG_UPLOAD, Kind.AGG_RESULT):
        if len(t) != 1 or t[0].dtype != torch.int64 or t[0].dim() != 1 or t[0].numel() < 2:
            raise FrameError("schema", f"{msg.kind.name} carries one int64 vector of >= 2 elements")
    elif msg.kind == Kind.TRUNK_SYNC:
        if len(t) != 1 or t[0].dtype != torch.uint8 or t[0].dim() != 1 or t[0].numel() == 0:
            raise FrameError("schema", "TRUNK_SYNC carries one non-empty uint8 vector")
    elif msg.kind == Kind.AGG_START and t:  # the participants' keys (shared/crypto/peer_keys.py)
        if len(t) != 1 or t[0].dtype != torch.uint8 or t[0].dim() != 1 or t[0].numel() == 0:
            raise FrameError("schema", "AGG_START carries at most one non-empty uint8 vector")
    elif msg.kind in kinds_with_hidden_only:
        if len(t) != 1:
            raise FrameError("schema", f"{msg.kind.name} carries 1 tensor, got {len(t)}")
        _check_hidden(t[0])
    elif t:
        raise FrameError("schema", f"{msg.kind.name} carries no tensors, got {len(t)}")


def _check_hidden(t: torch.Tensor) -> None:
    if t.dim() != 3 or WIRE_DTYPE[t.dtype] not in FLOAT_WIRE_DTYPES:
        raise FrameError("schema", f"{_HIDDEN} must be a float [B,T,H] tensor, got {t.dtype} {tuple(t.shape)}")
    if 0 in t.shape:
        raise FrameError("schema", f"empty {_HIDDEN} tensor {tuple(t.shape)}")
