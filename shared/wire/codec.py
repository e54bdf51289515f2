"""The one place where message sealing plugs in.

Silo agents and trunk workers turn every message into frames and back through a codec, never
through shared.wire.wire directly. ``PlainCodec`` sends payloads in the clear. The sealing layer (the
encryption issue) provides a codec with the same two methods that seals each payload with the
session key (header bytes as associated data, FLAG_SEALED set) and opens it on receipt. The broker
needs no codec: it only reads headers, which stay in the clear as routing information.

Both codecs also apply the run's wire format on the way out: ``wire_dtype`` int8 / fp8-* quantizes
the hidden tensor of each data message (shared/wire/compression.py; fp32/bf16/fp16 are casts the
roles do themselves), and a tensor larger than ``chunk_bytes`` travels in chunks
(shared/wire/chunks.py). Decoding needs neither setting: the header describes both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from shared.wire.chunks import DEFAULT_CHUNK_BYTES, check_chunk_bytes
from shared.wire.compression import WIRE_FORMATS, compress_message
from shared.wire.wire import Message, SplitMessage, message_from_wire, message_to_wire


class Codec(Protocol):
    def encode(self, msg: Message) -> list: ...

    def decode(self, frames: Sequence, split: SplitMessage | None = None) -> Message: ...


class PlainCodec:
    """Zero-copy both ways: payloads are sent from the tensors' memory, received tensors alias the
    ZeroMQ frames. Nothing to allocate, nothing to pool."""

    def __init__(self, max_tensor_bytes: int, wire_dtype: str = "fp32", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.wire_dtype = check_wire_dtype(wire_dtype)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.encode_s = 0.0  # cumulative, for `splitfed bench step`
        self.decode_s = 0.0

    def encode(self, msg: Message) -> list:
        t0 = time.perf_counter()
        frames = message_to_wire(compress_message(msg, self.wire_dtype), chunk_bytes=self.chunk_bytes)
        self.encode_s += time.perf_counter() - t0
        return frames

    def decode(self, frames: Sequence, split: SplitMessage | None = None) -> Message:
        """Raises shared.wire.wire.FrameError on anything malformed. ``split``: split_frames' result."""
        t0 = time.perf_counter()
        try:
            return message_from_wire(frames, self.max_tensor_bytes, split)
        finally:
            self.decode_s += time.perf_counter() - t0

    def crypto_seconds(self) -> float:
        return 0.0

    def allocations(self) -> int:
        return 0


def check_wire_dtype(wire_dtype: str) -> str:
    if wire_dtype not in WIRE_FORMATS:
        raise ValueError(f"wire dtype {wire_dtype!r}: one of {', '.join(WIRE_FORMATS)}")
    return wire_dtype
