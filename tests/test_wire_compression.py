"""int8 / fp8 wire format: error bounds, round trips plain and sealed, and every bad received field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shared.crypto.sealed_codec import SealedCodec
from shared.state.run_config import differences, run_config
from shared.runtime.settings import SiloSettings, TrunkSettings
from shared.wire.codec import PlainCodec
from shared.wire.compression import (
    HIDDEN_KINDS,
    SCALE_DTYPE,
    SCHEMES,
    QuantizeError,
    compress_message,
    dequantize,
    error_bound,
    expand_tensors,
    quantize,
)
from shared.wire.protocol import Kind
from shared.wire.wire import FrameError, Message, message_from_wire, message_to_wire, split_frames
from splitfed.bench.crypto import session_pair

SCHEME_NAMES = sorted(SCHEMES)


def rows_of_every_magnitude(b=3, t=7, h=64) -> torch.Tensor:
    """Rows from 1e-38 to 1e30 (gradients are tiny, first-token activations huge), one zero row."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, h, generator=g)
    magnitudes = torch.logspace(-38, 30, b * t).reshape(b, t, 1)
    x = x * magnitudes
    x[0, 0] = 0.0
    x[1, 2, 5] = 1e4 * x[1, 2].abs().max()  # an outlier channel dominates its row
    return x


@pytest.mark.parametrize("name", SCHEME_NAMES)
def test_round_trip_error_is_within_the_bound_per_element(name):
    scheme = SCHEMES[name]
    x = rows_of_every_magnitude()
    values, scales = quantize(x, scheme)
    assert values.dtype == scheme.dtype and values.shape == x.shape
    assert scales.dtype == SCALE_DTYPE and scales.shape == x.shape[:-1]
    back = dequantize(values, scales)
    assert back.dtype == torch.float32
    err = (x - back).abs()
    # the bound of the module doc, plus float32 rounding of the division and the product
    slack = x.abs() * 2.0**-22 + scales.float().unsqueeze(-1) * 2.0**-20
    assert bool((err <= error_bound(x, scales, scheme) + slack).all()), float((err - error_bound(x, scales, scheme)).max())
    assert bool((back[0, 0] == 0).all())  # a zero row stays exactly zero


def test_int8_bound_is_half_a_scale_and_values_stay_in_the_symmetric_range():
    x = rows_of_every_magnitude()
    values, scales = quantize(x, SCHEMES["int8"])
    assert int(values.min()) >= -127 and int(values.max()) <= 127
    err = (x - dequantize(values, scales)).abs()
    half = scales.float().unsqueeze(-1) / 2
    assert bool((err <= half * (1 + 2.0**-20) + x.abs() * 2.0**-23).all())
    # the scale covers the row: its largest element maps to +-127 or +-126 (the bf16 scale is rounded up)
    assert bool((values.abs().amax(-1)[scales > 0] >= 126).all())


def test_scales_rounded_up_to_bfloat16_always_cover_the_row_even_below_bfloat16_normals():
    x = torch.tensor([[[1e-41, -3e-42, 0.0]], [[3.3e38, -1.0, 2.0]]])
    values, scales = quantize(x, SCHEMES["int8"])
    assert bool((scales.float() * 127 >= x.abs().amax(-1)).all())
    assert torch.isfinite(dequantize(values, scales)).all()


def test_non_finite_values_cannot_be_quantized():
    for bad in (float("nan"), float("inf")):
        x = torch.ones(1, 2, 4)
        x[0, 1, 2] = bad
        with pytest.raises(QuantizeError):
            quantize(x, SCHEMES["int8"])


def hidden_message(kind: Kind, b=2, t=5, h=16) -> Message:
    g = torch.Generator().manual_seed(int(kind))
    x = torch.randn(b, t, h, generator=g)
    extra = {
        Kind.FORWARD: [torch.ones(b, t, dtype=torch.uint8), torch.arange(t, dtype=torch.int32).expand(b, t).contiguous()],
        Kind.GENERATE: [torch.ones(b, t, dtype=torch.uint8), torch.arange(t, dtype=torch.int32).expand(b, t).contiguous()],
        Kind.BACKWARD_RESULT: [torch.tensor([7], dtype=torch.int64)],
    }.get(kind, [])
    return Message(kind, "run1", "s0", 0, 3, tensors=[x, *extra])


@pytest.mark.parametrize("name", SCHEME_NAMES)
@pytest.mark.parametrize("kind", sorted(HIDDEN_KINDS))
def test_every_hidden_kind_round_trips_through_the_plain_codec(kind, name):
    msg = hidden_message(kind)
    codec = PlainCodec(1 << 20, name)
    frames = codec.encode(msg)
    b, t, h = msg.tensors[0].shape
    # values and scales are two payloads in place of the hidden tensor: 1 byte per value, 2 per token
    assert [memoryview(f).nbytes for f in frames[1:3]] == [b * t * h, b * t * 2]
    back = codec.decode([bytes(f) for f in frames])
    assert back.kind == kind and len(back.tensors) == len(msg.tensors)
    assert back.tensors[0].dtype == torch.float32
    values, scales = quantize(msg.tensors[0], SCHEMES[name])
    assert torch.equal(back.tensors[0], dequantize(values, scales))
    for a, c in zip(msg.tensors[1:], back.tensors[1:]):
        assert torch.equal(a, c)


def test_cast_formats_leave_the_frames_as_they_were():
    msg = hidden_message(Kind.FORWARD)
    assert compress_message(msg, "fp32") is msg
    assert [bytes(f) for f in PlainCodec(1 << 20, "fp32").encode(msg)] == [bytes(f) for f in message_to_wire(msg)]
    with pytest.raises(ValueError):
        compress_message(msg, "int4")
    with pytest.raises(ValueError):
        PlainCodec(1 << 20, "int4")


def test_kinds_without_a_hidden_tensor_are_not_quantized():
    msg = Message(Kind.AGG_UPLOAD, "run1", "s0", tensors=[torch.arange(5, dtype=torch.int64)])
    assert compress_message(msg, "int8") is msg


@pytest.mark.parametrize("name", SCHEME_NAMES)
def test_sealed_round_trip_and_both_payloads_are_authenticated(name):
    silo, trunk = session_pair(silo_id="s0", run_id="run1")
    sender, receiver = SealedCodec(1 << 20, name), SealedCodec(1 << 20)  # decoding needs no setting
    sender.sessions.add(silo)
    receiver.sessions.add(trunk)
    msg = hidden_message(Kind.FORWARD)
    frames = [bytes(f) for f in sender.encode(msg)]
    back = receiver.decode(frames)
    values, scales = quantize(msg.tensors[0], SCHEMES[name])
    assert torch.equal(back.tensors[0], dequantize(values, scales))
    for payload in (1, 2):  # the values, then the scales
        again = [bytes(f) for f in sender.encode(msg)]
        tampered = bytearray(again[payload])
        tampered[0] ^= 1
        with pytest.raises(FrameError) as err:
            receiver.decode([*again[:payload], bytes(tampered), *again[payload + 1:]])
        assert err.value.reason == "bad_tag"
    assert receiver.decode([bytes(f) for f in sender.encode(msg)]).kind == Kind.FORWARD  # still usable


# ---------------------------------------------------------------- bad received fields


def quantized_frames(scales: torch.Tensor | None = None, values: torch.Tensor | None = None,
                     kind: Kind = Kind.FORWARD_RESULT) -> list[bytes]:
    """A FORWARD_RESULT whose values/scales are replaced as given (what a hostile sender could put)."""
    msg = compress_message(hidden_message(kind), "int8")
    tensors = list(msg.tensors)
    if values is not None:
        tensors[0] = values
    if scales is not None:
        tensors[1] = scales
    return [bytes(f) for f in message_to_wire(dataclasses.replace(msg, tensors=tensors))]


def refused(frames, reason: str) -> None:
    codec = PlainCodec(1 << 20)
    with pytest.raises(FrameError) as err:
        codec.decode(frames)
    assert err.value.reason == reason, err.value
    assert codec.decode(quantized_frames()).kind == Kind.FORWARD_RESULT  # the receiver goes on


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 3e38])
def test_bad_scales_are_refused(bad):
    scales = quantize(hidden_message(Kind.FORWARD_RESULT).tensors[0], SCHEMES["int8"])[1]
    scales[1, 3] = bad
    refused(quantized_frames(scales=scales), "bad_scale")


def test_scales_of_the_wrong_shape_or_dtype_are_refused():
    scales = quantize(hidden_message(Kind.FORWARD_RESULT).tensors[0], SCHEMES["int8"])[1]
    refused(quantized_frames(scales=scales[:, :-1].contiguous()), "schema")
    refused(quantized_frames(scales=scales.float()), "schema")  # not bfloat16: a bare int8 tensor after all


def test_int8_minus_128_is_refused():
    values = quantize(hidden_message(Kind.FORWARD_RESULT).tensors[0], SCHEMES["int8"])[0]
    values[0, 0, 0] = -128
    refused(quantized_frames(values=values), "bad_quantized")


@pytest.mark.parametrize("name", ["fp8-e4m3", "fp8-e5m2"])
def test_float8_nan_or_inf_is_refused(name):
    msg = compress_message(hidden_message(Kind.FORWARD_RESULT), name)
    values = msg.tensors[0].clone()
    values.view(torch.uint8)[0, 0, 0] = 0x7F  # NaN in e4m3fn, NaN in e5m2 too
    frames = [bytes(f) for f in message_to_wire(dataclasses.replace(msg, tensors=[values, msg.tensors[1]]))]
    refused(frames, "bad_quantized")


def test_quantized_values_without_scales_are_refused():
    msg = compress_message(hidden_message(Kind.FORWARD_RESULT), "int8")
    frames = [bytes(f) for f in message_to_wire(dataclasses.replace(msg, tensors=msg.tensors[:1]))]
    refused(frames, "schema")


def test_a_quantized_pair_where_the_mask_belongs_is_refused_by_the_schema():
    msg = hidden_message(Kind.FORWARD)
    values, scales = quantize(msg.tensors[1].float(), SCHEMES["int8"])
    frames = [bytes(f) for f in message_to_wire(dataclasses.replace(msg, tensors=[msg.tensors[0], values, scales]))]
    refused(frames, "schema")


def test_expand_tensors_leaves_plain_lists_alone():
    plain = [torch.ones(2), torch.zeros(3, dtype=torch.uint8)]
    assert expand_tensors(plain) is plain


def test_the_wire_dtype_is_part_of_the_run_config_so_roles_must_agree():
    silo = run_config(SiloSettings(silo_id="s0", broker_frontend="tcp://127.0.0.1:1", data="x.jsonl",
                                   wire_dtype="int8", encryption=False))
    trunk = run_config(TrunkSettings(wire_dtype="fp32", encryption=False))
    assert [d[0] for d in differences(trunk, silo)] == ["wire_dtype"]


def test_split_frames_of_a_quantized_message_checks_each_payload_size():
    frames = quantized_frames()
    header, _, payloads, _ = split_frames(frames)
    assert [d.dtype.name for d in header.tensors] == ["INT8", "BFLOAT16"]
    with pytest.raises(FrameError) as err:
        message_from_wire([frames[0], frames[1], frames[2][:-2]])
    assert err.value.reason == "size_mismatch"


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8", "fp8-e4m3"])
def test_hidden_bytes_per_token_is_what_the_codec_sends(name):
    from shared.wire.compression import hidden_bytes_per_token
    from shared.wire.protocol import WIRE_DTYPE_BY_NAME

    msg = hidden_message(Kind.FORWARD_RESULT, b=2, t=5, h=16)
    msg = dataclasses.replace(msg, tensors=[msg.tensors[0].to(WIRE_DTYPE_BY_NAME[name])])
    frames = PlainCodec(1 << 20, name).encode(msg)
    assert sum(memoryview(f).nbytes for f in frames[1:]) == 2 * 5 * hidden_bytes_per_token(name, 16)


def test_auto8_sends_whichever_of_int8_and_fp8_reconstructs_the_tensor_better():
    from shared.wire.compression import quantize_best

    g = torch.Generator().manual_seed(3)
    uniform = torch.rand(2, 6, 64, generator=g) * 2 - 1  # int8's even grid wins
    outliers = torch.randn(2, 6, 64, generator=g)
    outliers[..., 7] = 300.0  # one massive channel per row (as in SmolLM2's h2): fp8's relative precision wins
    for x, want in ((uniform, torch.int8), (outliers, torch.float8_e4m3fn)):
        values, scales = quantize_best(x, ("int8", "fp8-e4m3"))
        assert values.dtype == want
        errors = [float((dequantize(*quantize(x, SCHEMES[n])) - x).square().sum()) for n in ("int8", "fp8-e4m3")]
        assert float((dequantize(values, scales) - x).square().sum()) == min(errors)
        msg = Message(Kind.FORWARD_RESULT, "run1", "s0", tensors=[x])
        back = PlainCodec(1 << 20, "auto8").decode([bytes(f) for f in PlainCodec(1 << 20, "auto8").encode(msg)])
        assert torch.equal(back.tensors[0], dequantize(values, scales))
