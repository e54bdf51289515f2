"""Chunked payloads: round trips plain and sealed, every chunk attack refused, bounds before allocation,
and a 300 MiB tensor through a real ZeroMQ socket with the receiver's memory measured."""

from __future__ import annotations

import dataclasses
import gc
import struct

import pytest
import torch
import zmq

from shared.crypto.frame_units import sealed_nbytes, units
from shared.crypto.sealed_codec import SealedCodec
from shared.wire.chunks import MAX_CHUNK_SHIFT, MAX_CHUNKS, MIN_CHUNK_SHIFT, Chunks, chunk_shift_for
from shared.wire.codec import PlainCodec
from shared.wire.header import HEADER, TENSOR_DESC
from shared.wire.protocol import SEAL_OVERHEAD, Kind, WireDtype
from shared.wire.wire import (
    FrameError,
    Header,
    Message,
    TensorDesc,
    bundle_from_wire,
    bundle_to_wire,
    header_from_wire,
    header_to_wire,
    message_to_wire,
    split_frames,
)
from splitfed.bench.crypto import session_pair

CHUNK = 1 << MIN_CHUNK_SHIFT  # 4 KiB: many chunks from small tensors
MIB = 1 << 20


def forward(b=1, t=1000, h=9, positions=torch.int64, seed=0) -> Message:
    """h1 of 36000 bytes (8 full 4 KiB chunks + 3232), positions of 8000 (2 chunks), mask of 1000 (unchunked)."""
    g = torch.Generator().manual_seed(seed)
    return Message(Kind.FORWARD, "run1", "s0", 0, 5, tensors=[
        torch.randn(b, t, h, generator=g), torch.ones(b, t, dtype=torch.uint8),
        torch.arange(t, dtype=positions).expand(b, t).contiguous()])


def sealed_pair(max_tensor_bytes: int = 1 << 30):
    silo, trunk = session_pair(silo_id="s0", run_id="run1", max_tensor_bytes=max_tensor_bytes)
    sender, receiver = SealedCodec(max_tensor_bytes, chunk_bytes=CHUNK), SealedCodec(max_tensor_bytes)
    sender.sessions.add(silo)
    receiver.sessions.add(trunk)
    return sender, receiver


def as_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def test_chunk_geometry_of_a_message():
    msg = forward()
    frames = message_to_wire(msg, chunk_bytes=CHUNK)
    header = header_from_wire(frames[0])
    assert [d.chunk_shift for d in header.tensors] == [MIN_CHUNK_SHIFT, 0, MIN_CHUNK_SHIFT]
    assert [d.n_frames for d in header.tensors] == [9, 1, 2]
    assert len(frames) == header.n_frames == 1 + 9 + 1 + 2
    assert [memoryview(f).nbytes for f in frames[1:10]] == [CHUNK] * 8 + [36000 - 8 * CHUNK]
    assert chunk_shift_for(CHUNK, CHUNK) == 0  # exactly one chunk: sent unchunked (the canonical form)


def test_plain_chunked_round_trip_is_exact():
    msg = forward()
    back = PlainCodec(1 << 30, chunk_bytes=CHUNK).decode(as_bytes(message_to_wire(msg, chunk_bytes=CHUNK)))
    assert all(torch.equal(a, b) for a, b in zip(msg.tensors, back.tensors))


def test_sealed_chunked_round_trip_is_exact_and_every_unit_has_its_own_nonce():
    sender, receiver = sealed_pair()
    msg = forward()
    frames = sender.encode(msg)
    header = header_from_wire(frames[0])
    assert [memoryview(f).nbytes for f in frames[1:10]] == [CHUNK + SEAL_OVERHEAD] * 8 + [36000 - 8 * CHUNK + 16]
    back = receiver.decode(as_bytes(frames))
    assert all(torch.equal(a, b) for a, b in zip(msg.tensors, back.tensors))
    nonces = [u[0] for i, d in enumerate(header.tensors) for label in (b"S>T",) for u in units(label, i, d, header.seq, b"")]
    assert len(nonces) == 12 and len(set(nonces)) == 12 and all(len(n) == 12 for n in nonces)
    assert sum(sealed_nbytes(d) for d in header.tensors) == sum(memoryview(f).nbytes for f in frames[1:])


# ---------------------------------------------------------------- attacks on sealed chunks


def refused(receiver: SealedCodec, sender: SealedCodec, frames: list[bytes], reason: str) -> None:
    with pytest.raises(FrameError) as err:
        receiver.decode(frames)
    assert err.value.reason == reason, err.value
    # the receiver stays usable: the next genuine message opens (a forgery burnt no counter)
    msg = forward(seed=9)
    assert torch.equal(receiver.decode(as_bytes(sender.encode(msg))).tensors[0], msg.tensors[0])


def test_a_tampered_chunk_fails_its_tag_and_the_output_is_zeroed():
    sender, receiver = sealed_pair()
    frames = as_bytes(sender.encode(forward()))
    bad = bytearray(frames[6])
    bad[100] ^= 0x20
    refused(receiver, sender, [*frames[:6], bytes(bad), *frames[7:]], "bad_tag")


def test_reordered_chunks_fail():
    sender, receiver = sealed_pair()
    frames = as_bytes(sender.encode(forward()))
    frames[2], frames[3] = frames[3], frames[2]  # same size: only the nonce and AAD tell them apart
    refused(receiver, sender, frames, "bad_tag")


def test_a_duplicated_chunk_in_place_of_another_fails():
    sender, receiver = sealed_pair()
    frames = as_bytes(sender.encode(forward()))
    frames[4] = frames[3]
    refused(receiver, sender, frames, "bad_tag")


def test_a_missing_chunk_is_a_frame_count_error():
    sender, receiver = sealed_pair()
    frames = as_bytes(sender.encode(forward()))
    refused(receiver, sender, frames[:5] + frames[6:], "frame_count")


def test_an_extra_chunk_is_a_frame_count_error():
    sender, receiver = sealed_pair()
    frames = as_bytes(sender.encode(forward()))
    refused(receiver, sender, [*frames[:5], frames[5], *frames[5:]], "frame_count")


def test_a_chunk_of_another_payload_of_the_same_message_fails():
    sender, receiver = sealed_pair()
    frames = as_bytes(sender.encode(forward()))
    frames[1] = frames[11]  # chunk 0 of the positions (same size) in place of chunk 0 of h1
    refused(receiver, sender, frames, "bad_tag")


def test_a_chunk_spliced_from_another_message_fails():
    sender, receiver = sealed_pair()
    first = as_bytes(sender.encode(forward(seed=1)))
    second = as_bytes(sender.encode(forward(seed=2)))  # same header but its seq (the nonce counter)
    spliced = [*second[:3], first[3], *second[4:]]
    refused(receiver, sender, spliced, "bad_tag")
    assert receiver.decode(first).step == 5  # the genuine messages still open, once each
    assert receiver.decode(second).step == 5


def test_a_relay_cannot_rechunk_a_sealed_payload():
    """Merging chunks under a restated shift (12 -> 13): every chunk's tag stays inside its frame,
    so the sizes no longer match (and the header, being the associated data, would fail the tag)."""
    sender, receiver = sealed_pair()
    frames = as_bytes(sender.encode(forward()))
    head = bytearray(frames[0])
    head[HEADER.size + 2] = MIN_CHUNK_SHIFT + 1
    merged = [frames[1] + frames[2], frames[3] + frames[4], frames[5] + frames[6], frames[7] + frames[8], frames[9]]
    refused(receiver, sender, [bytes(head), *merged, *frames[10:]], "size_mismatch")


def test_oversized_and_truncated_chunks_are_size_mismatches():
    sender, receiver = sealed_pair()
    frames = as_bytes(sender.encode(forward()))
    refused(receiver, sender, [*frames[:2], frames[2] + b"\0", *frames[3:]], "size_mismatch")
    frames = as_bytes(sender.encode(forward()))
    refused(receiver, sender, [*frames[:9], frames[9][:-1], *frames[10:]], "size_mismatch")


# ---------------------------------------------------------------- bounds, before any allocation


def header_with(dtype: WireDtype, shape: tuple, shift: int, pad: int = 0) -> bytes:
    good = header_to_wire(Header(Kind.FORWARD_RESULT, "run1", "s0", tensors=(TensorDesc(WireDtype.FLOAT32, (1, 1, 4)),)))
    dims = list(shape) + [0] * (4 - len(shape))
    desc = bytearray(TENSOR_DESC.pack(int(dtype), len(shape), shift, *dims))
    desc[3] = pad
    return good[:HEADER.size] + bytes(desc)


@pytest.mark.parametrize("shape, shift, limit, reason", [
    ((1, 1 << 16, 1 << 14), 20, 1 << 30, "too_large"),  # 4 GiB announced, 1 GiB allowed: refused unallocated
    ((1, 4, 1 << 20), MIN_CHUNK_SHIFT - 1, 1 << 30, "bad_field"),  # chunk shift below the minimum
    ((1, 4, 1 << 20), MAX_CHUNK_SHIFT + 1, 1 << 40, "bad_field"),  # above the maximum
    ((1, 1 << 16, 1 << 14), MIN_CHUNK_SHIFT, 1 << 40, "bad_field"),  # 2**20 chunks > MAX_CHUNKS
    ((1, 1, 1024), MIN_CHUNK_SHIFT, 1 << 30, "bad_field"),  # one chunk: not canonical
    ((1, 1 << 9, 1 << 20), 0, 1 << 40, "bad_field"),  # 2 GiB unchunked: no AEAD call takes it
])
def test_headers_announcing_impossible_chunking_are_refused(shape, shift, limit, reason):
    with pytest.raises(FrameError) as err:
        header_from_wire(header_with(WireDtype.FLOAT32, shape, shift), limit)
    assert err.value.reason == reason, err.value


def test_the_descriptor_pad_byte_must_be_zero():
    with pytest.raises(FrameError) as err:
        header_from_wire(header_with(WireDtype.FLOAT32, (1, 1, 4), 0, pad=1))
    assert err.value.reason == "bad_field"


def test_chunk_limits_are_consistent():
    assert (1 << MAX_CHUNK_SHIFT) + SEAL_OVERHEAD < 2**31 - 1  # every chunk fits one AEAD call
    with pytest.raises(ValueError):
        chunk_shift_for(MAX_CHUNKS * CHUNK + 1, CHUNK)
    with pytest.raises(ValueError):
        PlainCodec(1 << 20, chunk_bytes=CHUNK + 1)  # not a power of two


def test_split_frames_hands_chunks_on_and_bundles_count_them():
    frames = as_bytes(message_to_wire(forward(), chunk_bytes=CHUNK))
    header, _, payloads, _ = split_frames(frames)
    assert isinstance(payloads[0], Chunks) and len(payloads[0]) == 9 and not isinstance(payloads[1], Chunks)
    bundle = bundle_to_wire(Message(Kind.BUNDLE, "run1", "broker", 0, 5), [frames, frames])
    _, members = bundle_from_wire(bundle)
    assert [len(m) for m in members] == [13, 13]


def test_a_sealed_payload_handed_over_unchunked_is_refused():
    sender, receiver = sealed_pair()
    frames = as_bytes(sender.encode(forward()))
    header, header_bytes, payloads, _ = split_frames(frames)
    session = receiver.sessions.get("s0", 0)
    with pytest.raises(FrameError) as err:
        session.open(header_bytes, [b"".join(payloads[0]), payloads[1], payloads[2]], header=header)
    assert err.value.reason == "frame_count"


# ---------------------------------------------------------------- hundreds of MiB, over a real socket


def _rss() -> tuple[int, int]:
    """(current, peak) resident set of this process, bytes (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
        f.write("5")


@pytest.mark.slow
def test_300_mib_sealed_in_chunks_over_zeromq_with_bounded_receiver_memory():
    size = 300 * MIB
    h = size // 4 // 4096
    max_bytes = 512 * MIB
    silo, trunk = session_pair(silo_id="s0", run_id="run1", max_tensor_bytes=max_bytes)
    sender, receiver = SealedCodec(max_bytes, chunk_bytes=16 * MIB), SealedCodec(max_bytes)
    sender.sessions.add(silo)
    receiver.sessions.add(trunk)
    x = torch.arange(4096 * h, dtype=torch.float32).reshape(1, 4096, h)  # 300 MiB, every element distinct
    msg = Message(Kind.FORWARD_RESULT, "run1", "s0", 0, 1, tensors=[x])
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        for s in (push, pull):
            s.setsockopt(zmq.LINGER, 0)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")

        gc.collect()
        _reset_peak()
        rss0 = _rss()[0]
        frames = sender.encode(msg)
        sender_growth = _rss()[1] - rss0
        assert len(frames) == 1 + 19  # 300 MiB in 16 MiB chunks: 18 full + 1 short
        push.send_multipart(frames, copy=False)
        received = pull.recv_multipart(copy=False)
        del frames  # sent: the sender's ciphertext can go
        gc.collect()

        _reset_peak()
        rss1 = _rss()[0]
        back = receiver.decode([f.buffer for f in received])
        receiver_growth = _rss()[1] - rss1
        del received
        assert back.tensors[0].shape == x.shape and torch.equal(back.tensors[0], x)
    finally:
        push.close()
        pull.close()
        ctx.term()
    # The sender adds the ciphertext, the receiver the plaintext, once each: no joined copy of
    # the chunks, no second buffer (1.0x payload plus allocator noise).
    print(f"\n300 MiB sealed in chunks: sender peak growth {sender_growth / size:.3f}x payload, "
          f"receiver peak growth while opening {receiver_growth / size:.3f}x payload")
    assert sender_growth <= 1.1 * size
    assert receiver_growth <= 1.1 * size
