"""Wire format: round trips of every kind and dtype, and rejection of malformed input."""

from __future__ import annotations

import struct

import pytest
import torch

from shared.wire.protocol import MAX_TENSORS, Kind, WireDtype
from shared.wire.wire import (
    HEADER,
    TENSOR_DESC,
    FrameError,
    Header,
    Message,
    TensorDesc,
    check_id,
    header_from_wire,
    header_to_wire,
    message_from_wire,
    message_to_wire,
    tensor_from_wire,
    tensor_to_wire,
)


def forward_msg(b=2, t=5, h=8, dtype=torch.float32) -> Message:
    g = torch.Generator().manual_seed(0)
    return Message(
        Kind.FORWARD, "run-1", "silo0", round=3, step=17, seq=99,
        tensors=[torch.randn(b, t, h, generator=g).to(dtype), torch.ones(b, t, dtype=torch.uint8),
                 torch.arange(t, dtype=torch.int32).expand(b, t).contiguous()],
    )


def to_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_round_trip_is_bit_exact(dtype):
    msg = forward_msg(dtype=dtype)
    back = message_from_wire(to_bytes(message_to_wire(msg)))
    assert (back.kind, back.run_id, back.silo_id, back.round, back.step, back.seq) == (
        Kind.FORWARD, "run-1", "silo0", 3, 17, 99)
    for a, b in zip(msg.tensors, back.tensors):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a,
                           b.view(torch.uint8) if b.dtype != torch.uint8 else b)


@pytest.mark.parametrize("kind", [Kind.FORWARD_RESULT, Kind.BACKWARD])
def test_hidden_only_kinds_round_trip(kind):
    t = torch.randn(3, 4, 16)
    back = message_from_wire(to_bytes(message_to_wire(Message(kind, "r", "s", tensors=[t]))))
    assert back.kind == kind and torch.equal(back.tensors[0], t)


def test_backward_result_carries_the_applied_counter():
    msg = Message(Kind.BACKWARD_RESULT, "r", "s", tensors=[torch.randn(1, 2, 8), torch.tensor([41])])
    back = message_from_wire(to_bytes(message_to_wire(msg)))
    assert int(back.tensors[1][0]) == 41
    bad = Message(Kind.BACKWARD_RESULT, "r", "s", tensors=[torch.randn(1, 2, 8)])
    rejected(to_bytes(message_to_wire(bad)), "schema")


def test_backward_result_carries_the_trunks_compute_time_too():
    msg = Message(Kind.BACKWARD_RESULT, "r", "s", tensors=[torch.randn(1, 2, 8), torch.tensor([41, 12345])])
    assert message_from_wire(to_bytes(message_to_wire(msg))).tensors[1].tolist() == [41, 12345]
    bad = Message(Kind.BACKWARD_RESULT, "r", "s", tensors=[torch.randn(1, 2, 8), torch.tensor([1, 2, 3])])
    rejected(to_bytes(message_to_wire(bad)), "schema")


def test_a_forward_says_whether_more_pieces_of_its_step_follow():
    msg = forward_msg()
    assert not message_from_wire(to_bytes(message_to_wire(msg))).more
    msg.more = True
    frames = to_bytes(message_to_wire(msg))
    assert header_from_wire(frames[0]).more and message_from_wire(frames).more


def test_only_a_forward_may_say_more_pieces_follow():
    frames = to_bytes(message_to_wire(forward_msg()))
    h = bytearray(to_bytes(message_to_wire(Message(Kind.BACKWARD, "r", "s", tensors=[torch.randn(1, 2, 8)])))[0])
    h[6] |= 4  # FLAG_MORE on a BACKWARD
    with pytest.raises(FrameError) as err:
        header_from_wire(bytes(h))
    assert err.value.reason == "bad_field" and "only a FORWARD" in str(err.value)
    assert message_from_wire(frames).kind == Kind.FORWARD


@pytest.mark.parametrize("kind", [Kind.HELLO, Kind.HELLO_ACK])
def test_handshake_kinds_carry_one_bounded_byte_vector(kind):
    hello = torch.arange(196, dtype=torch.int64).to(torch.uint8)
    assert torch.equal(message_from_wire(to_bytes(message_to_wire(Message(kind, "r", "s", tensors=[hello])))).tensors[0], hello)
    rejected(to_bytes(message_to_wire(Message(kind, "r", "s", tensors=[torch.zeros(300, dtype=torch.uint8)]))), "schema")
    rejected(to_bytes(message_to_wire(Message(kind, "r", "s", tensors=[torch.zeros(2, 3, dtype=torch.uint8)]))), "schema")


@pytest.mark.parametrize("kind", [Kind.READY, Kind.HEARTBEAT, Kind.DISCONNECT])
def test_control_kinds_round_trip(kind):
    back = message_from_wire(to_bytes(message_to_wire(Message(kind, "r", "trunk0"))))
    assert back.kind == kind and back.tensors == [] and back.text is None


def test_error_text_round_trip():
    back = message_from_wire(to_bytes(message_to_wire(Message(Kind.ERROR, "r", "s", step=4, text="no_open_step: x"))))
    assert back.text == "no_open_step: x" and back.step == 4


@pytest.mark.parametrize("dtype", list(WireDtype))
def test_tensor_serde_pairs(dtype):
    from shared.wire.protocol import TORCH_DTYPE

    t = (torch.arange(24) % 7).to(TORCH_DTYPE[dtype]).view(2, 3, 4)
    desc, buf = tensor_to_wire(t)
    assert desc == TensorDesc(dtype, (2, 3, 4)) and buf.nbytes == desc.nbytes
    assert torch.equal(tensor_from_wire(desc, bytes(buf)), t)


def test_tensor_to_wire_is_zero_copy_for_contiguous_tensors():
    t = torch.randn(4, 4)
    _, buf = tensor_to_wire(t)
    t[0, 0] = 123.0  # the wire view sees the tensor's own memory
    assert torch.frombuffer(bytearray(buf), dtype=torch.float32)[0] == 123.0


def test_header_round_trip():
    h = Header(Kind.BACKWARD, "abc", "silo12", 1, 2, 3, 0, (TensorDesc(WireDtype.BFLOAT16, (1, 2, 3)),))
    assert header_from_wire(header_to_wire(h)) == h


# ------------------------------------------------------------------ malformed input


def good_frames() -> list[bytes]:
    return to_bytes(message_to_wire(forward_msg()))


def rejected(frames, reason: str | None = None, **kw) -> FrameError:
    with pytest.raises(FrameError) as err:
        message_from_wire(frames, **kw)
    if reason is not None:
        assert err.value.reason == reason, err.value
    return err.value


def test_empty_message():
    rejected([], "truncated")


def test_truncated_header():
    frames = good_frames()
    rejected([frames[0][:20], *frames[1:]], "truncated")


def test_bad_signature():
    frames = good_frames()
    rejected([b"XXXX" + frames[0][4:], *frames[1:]], "bad_signature")


def test_bad_version():
    frames = good_frames()
    h = bytearray(frames[0])
    h[4] = 99
    rejected([bytes(h), *frames[1:]], "bad_version")


def test_unknown_kind():
    frames = good_frames()
    h = bytearray(frames[0])
    h[5] = 200
    rejected([bytes(h), *frames[1:]], "bad_kind")


def test_unknown_flags():
    frames = good_frames()
    h = bytearray(frames[0])
    h[6] = 0x80
    rejected([bytes(h), *frames[1:]], "bad_field")


def test_too_many_tensors_claimed():
    frames = good_frames()
    h = bytearray(frames[0])
    h[7] = MAX_TENSORS + 1
    rejected([bytes(h), *frames[1:]], "too_large")


def test_bad_identifier_bytes():
    frames = good_frames()
    h = bytearray(frames[0])
    h[8:12] = b"\xff\xfe;;"
    rejected([bytes(h), *frames[1:]], "bad_field")


def test_unknown_dtype_code():
    frames = good_frames()
    h = bytearray(frames[0])
    h[HEADER.size] = 77
    rejected([bytes(h), *frames[1:]], "bad_field")


def test_oversized_tensor_is_refused_before_allocation():
    desc = TENSOR_DESC.pack(int(WireDtype.FLOAT32), 3, 0, 1 << 20, 1 << 20, 1 << 10, 0)
    head = bytearray(good_frames()[0])
    head[HEADER.size : HEADER.size + TENSOR_DESC.size] = desc
    rejected([bytes(head), b"", b"", b""], "too_large")


def test_payload_shorter_than_header_says():
    frames = good_frames()
    rejected([frames[0], frames[1][:-1], *frames[2:]], "size_mismatch")


def test_payload_longer_than_header_says():
    frames = good_frames()
    rejected([frames[0], frames[1] + b"\0", *frames[2:]], "size_mismatch")


def test_missing_and_extra_frames():
    frames = good_frames()
    rejected(frames[:-1], "frame_count")
    rejected([*frames, b"extra"], "frame_count")


def test_schema_wrong_tensor_count_for_kind():
    msg = Message(Kind.FORWARD, "r", "s", tensors=[torch.randn(2, 3, 4)])
    rejected(to_bytes(message_to_wire(msg)), "schema")


def test_schema_mask_shape_mismatch():
    msg = forward_msg()
    msg.tensors[1] = torch.ones(2, 4, dtype=torch.uint8)
    rejected(to_bytes(message_to_wire(msg)), "schema")


def test_schema_hidden_must_be_float():
    msg = Message(Kind.BACKWARD, "r", "s", tensors=[torch.ones(2, 3, 4, dtype=torch.int64)])
    rejected(to_bytes(message_to_wire(msg)), "schema")


def test_schema_control_message_with_tensor():
    msg = Message(Kind.HEARTBEAT, "r", "s", tensors=[torch.randn(1, 1, 1)])
    rejected(to_bytes(message_to_wire(msg)), "schema")


def test_sealed_flag_without_session_is_refused():
    frames = message_to_wire(Message(Kind.BACKWARD, "r", "s", tensors=[torch.randn(1, 2, 3)]), flags=1)
    # sealed payloads carry a 16-byte tag: append one so only the missing session is the problem
    rejected([bytes(frames[0]), bytes(frames[1]) + b"\0" * 16], "sealed")


def test_random_garbage_never_raises_anything_but_frame_error():
    g = torch.Generator().manual_seed(1)
    good = good_frames()
    for i in range(500):
        frames = [bytearray(f) for f in good]
        f = frames[i % len(frames)]
        if len(f):
            pos = int(torch.randint(len(f), (1,), generator=g))
            f[pos] ^= 1 << int(torch.randint(8, (1,), generator=g))
        try:
            message_from_wire([bytes(x) for x in frames])
        except FrameError:
            pass


@pytest.mark.parametrize("bad", ["", "x" * 17, "has space", "naïve", "a/b"])
def test_identifier_validation(bad):
    with pytest.raises(ValueError):
        check_id(bad)


def test_header_struct_is_stable():
    # The layout is the protocol: changing it needs a PROTOCOL_VERSION bump.
    assert HEADER.size == 56 and TENSOR_DESC.size == 20
    assert struct.calcsize("<4sBBBB16s16sIIQ") == HEADER.size


def test_a_header_parsed_once_is_handed_along_not_parsed_again(monkeypatch):
    """The trunk parses a frame's header to see its kind; split_frames and the codec then reuse it."""
    import shared.wire.wire as wire
    from shared.wire.codec import PlainCodec

    msg = Message(Kind.FORWARD, "run1", "silo0", 0, 3, tensors=[torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.uint8),
                                                                 torch.zeros(1, 2, dtype=torch.int32)])
    frames = message_to_wire(msg)
    header = wire.header_from_wire(frames[0])

    def parsed_again(*_a, **_k):
        raise AssertionError("the header was parsed a second time")

    monkeypatch.setattr(wire, "header_from_wire", parsed_again)
    split = wire.split_frames(frames, header=header)
    back = PlainCodec(1 << 20).decode(frames, split)
    assert (back.kind, back.step) == (Kind.FORWARD, 3) and torch.equal(back.tensors[0], msg.tensors[0])
