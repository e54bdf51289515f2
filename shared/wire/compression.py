"""Activation compression on the wire: h1, h2 and their gradients as 8-bit values with per-token scales.

``--wire-dtype int8`` (or ``fp8-e4m3`` / ``fp8-e5m2``, or ``auto8``: per tensor whichever of int8
and fp8-e4m3 reconstructs it better) makes a codec send the hidden tensor of every
FORWARD, FORWARD_RESULT, BACKWARD, BACKWARD_RESULT, GENERATE and GENERATE_RESULT as two tensors in
its place:

    q       int8 / float8 [B, T, H]   the values divided by their token's scale
    scales  bfloat16 [B, T]           one scale per token (row of H values)

Per token because the rows of an activation differ by orders of magnitude (a first token's
activation dwarfs the others; gradients of padded positions are zero), while within a row one scale
fits. ``scale = absmax / QMAX`` rounded *up* to bfloat16 (so ``|x| / scale <= QMAX`` holds after the
rounding), which bounds each element's error:

    int8:     |x - q * scale| <= scale / 2               (q = round(x / scale) in -127..127)
    fp8-e4m3: |x - q * scale| <= max(|x| * 2**-4, scale * 2**-10)    (3 mantissa bits, subnormals)
    fp8-e5m2: |x - q * scale| <= max(|x| * 2**-3, scale * 2**-17)

bfloat16 scales (not fp16) because gradients' scales go far below fp16's range; 2 bytes, not 4, keep
the step at (H + 2) / 4H of fp32's hidden bytes. Both tensors travel as ordinary payloads, so the
header describes them and sealing authenticates and encrypts both (shared/crypto/sealing.py).

The wire is self-describing: an int8/float8 tensor on the wire is always a quantized tensor followed
by its scales, whatever the receiver's own setting, and ``expand_tensors`` turns each pair back into
one float32 tensor before the per-kind schema is checked. Received scales and values are validated
(shape, dtype, finite, non-negative, bounded so the product stays finite; int8 never -128; float8
never NaN/inf): a bad one is a ``FrameError`` like any other bad frame.
"""

from __future__ import annotations

import dataclasses

import torch

from shared.wire.header import FrameError
from shared.wire.protocol import Kind

SCALE_DTYPE = torch.bfloat16
FLOAT32_MAX = torch.finfo(torch.float32).max
# The kinds whose first tensor is a hidden state or its gradient (shared/wire/schema.py).
HIDDEN_KINDS = frozenset({Kind.FORWARD, Kind.FORWARD_RESULT, Kind.BACKWARD, Kind.BACKWARD_RESULT,
                          Kind.GENERATE, Kind.GENERATE_RESULT})


class QuantizeError(ValueError):
    """A tensor cannot be quantized (it holds inf or NaN: training diverged on the sending side)."""


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    dtype: torch.dtype  # of the quantized values
    qmax: float  # largest |value| after dividing by the scale
    relative: float  # fp8: relative rounding error of a normal value (0 for int8: absolute only)
    subnormal: float  # fp8: absolute error floor in units of the scale (int8: 1/2)

    @property
    def is_int(self) -> bool:
        return not self.dtype.is_floating_point


SCHEMES = {
    "int8": Scheme("int8", torch.int8, 127.0, 0.0, 0.5),
    "fp8-e4m3": Scheme("fp8-e4m3", torch.float8_e4m3fn, 448.0, 2.0**-4, 2.0**-10),
    "fp8-e5m2": Scheme("fp8-e5m2", torch.float8_e5m2, 57344.0, 2.0**-3, 2.0**-17),
}
SCHEME_BY_DTYPE = {s.dtype: s for s in SCHEMES.values()}
# Per tensor, whichever scheme reconstructs it better in L2 (same bytes; the dtype code tells the
# receiver). Why it exists: on SmolLM2 (reports/perf/wire.json) int8 wins on h1 and both gradients,
# but h2 carries outlier channels that leave the rest of a row few int8 levels (4.8% error against
# fp8-e4m3's 1.3%). Measured, it does not pay: fp8 puts a few % error on the outlier channel itself,
# which dominates the tail's RMSNorm, so one step's loss moved more (+0.12 against int8's -0.03)
# for the same gradient cosine (0.9984). Kept as an experiment; int8 is the recommended format.
AUTO_FORMATS = {"auto8": ("int8", "fp8-e4m3")}
CAST_FORMATS = ("fp32", "bf16", "fp16")  # plain casts done by the roles themselves
WIRE_FORMATS = CAST_FORMATS + tuple(SCHEMES) + tuple(AUTO_FORMATS)


def quantize(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scales) of a float tensor [..., H]: one bfloat16 scale per row of the last dim."""
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"quantize a float tensor [..., H], not {x.dtype} {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise QuantizeError("the tensor holds inf or NaN: it cannot be quantized (training diverged?)")
    absmax = x.abs().amax(dim=-1)
    scales = (absmax / scheme.qmax).to(SCALE_DTYPE)
    # Rounding to bfloat16 may have gone down: step those scales up one ulp, so |x| / scale <= QMAX.
    low = scales.float() * scheme.qmax < absmax
    if bool(low.any()):
        scales[low] = torch.nextafter(scales[low], torch.full_like(scales[low], float("inf")))
    s = scales.float().unsqueeze(-1)
    scaled = torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0)
    if scheme.is_int:
        values = scaled.round_().clamp_(-scheme.qmax, scheme.qmax).to(scheme.dtype)
    else:
        values = scaled.clamp_(-scheme.qmax, scheme.qmax).to(scheme.dtype)
    return values, scales


def quantize_best(x: torch.Tensor, schemes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (values, scales) of whichever scheme gives the smallest squared error on ``x``."""
    best, best_err = None, None
    x32 = x.detach().to("cpu", torch.float32)
    for name in schemes:
        values, scales = quantize(x32, SCHEMES[name])
        err = float((dequantize(values, scales) - x32).square().sum())
        if best_err is None or err < best_err:
            best, best_err = (values, scales), err
    return best


def dequantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 ``values * scales[..., None]``, after validating both (FrameError on anything bad)."""
    scheme = SCHEME_BY_DTYPE.get(values.dtype)
    if scheme is None:
        raise FrameError("schema", f"{values.dtype} is not a quantized dtype")
    if values.dim() < 1 or values.shape[-1] == 0:
        raise FrameError("schema", f"quantized tensor of shape {tuple(values.shape)}")
    if scales.dtype != SCALE_DTYPE or tuple(scales.shape) != tuple(values.shape[:-1]):
        raise FrameError("schema", f"scales must be {SCALE_DTYPE} {tuple(values.shape[:-1])}, "
                                   f"got {scales.dtype} {tuple(scales.shape)}")
    s = scales.float()
    # finite, >= 0, and small enough that QMAX * scale stays a finite float32
    if not bool(((s >= 0) & (s <= FLOAT32_MAX / scheme.qmax)).all()):
        raise FrameError("bad_scale", "a scale is negative, NaN, inf or too large")
    if scheme.is_int and values.numel() and int(values.min()) < -scheme.qmax:
        raise FrameError("bad_quantized", f"int8 value below -{int(scheme.qmax)}")
    out = values.to(torch.float32).mul_(s.unsqueeze(-1))
    if not scheme.is_int and not bool(torch.isfinite(out).all()):
        raise FrameError("bad_quantized", "a float8 value is NaN or inf")
    return out


def error_bound(x: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The largest |x - dequantize(quantize(x))| the scheme allows for each element (see module doc)."""
    s = scales.float().unsqueeze(-1)
    return torch.maximum(x.float().abs() * scheme.relative, s * scheme.subnormal)


def hidden_bytes_per_token(wire_format: str, hidden: int) -> int:
    """Payload bytes of one token's row of a hidden tensor on the wire (before AEAD tags)."""
    if wire_format in SCHEMES or wire_format in AUTO_FORMATS:
        return hidden * 1 + SCALE_DTYPE.itemsize  # 8-bit values and the token's scale
    return hidden * {"fp32": 4, "bf16": 2, "fp16": 2}[wire_format]


# ---------------------------------------------------------------- whole messages


def compress_message(msg, wire_format: str):
    """The message to encode: its hidden tensor replaced by (values, scales) under a quantized
    ``wire_format``; unchanged for the cast formats and for kinds without a hidden tensor."""
    if wire_format not in WIRE_FORMATS:
        raise ValueError(f"wire format {wire_format!r}: one of {', '.join(WIRE_FORMATS)}")
    if (wire_format in CAST_FORMATS or msg.kind not in HIDDEN_KINDS or not msg.tensors
            or not msg.tensors[0].is_floating_point()):
        return msg
    if wire_format in AUTO_FORMATS:
        values, scales = quantize_best(msg.tensors[0], AUTO_FORMATS[wire_format])
    else:
        values, scales = quantize(msg.tensors[0], SCHEMES[wire_format])
    return dataclasses.replace(msg, tensors=[values, scales, *msg.tensors[1:]])


def expand_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Received tensors with every (quantized values, scales) pair turned into one float32 tensor."""
    if not any(t.dtype in SCHEME_BY_DTYPE for t in tensors):
        return tensors
    out, i = [], 0
    while i < len(tensors):
        t = tensors[i]
        if t.dtype in SCHEME_BY_DTYPE:
            if i + 1 == len(tensors):
                raise FrameError("schema", f"quantized tensor {i} without its scales")
            out.append(dequantize(t, tensors[i + 1]))
            i += 2
        else:
            out.append(t)
            i += 1
    return out
