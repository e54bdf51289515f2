"""Chunked payloads: one tensor's bytes as several ZeroMQ frames of a bounded size.

Why: a 7B model's step at long sequences moves [B, T, H] tensors of GiBs. One AEAD call of
``cryptography`` takes at most 2**31 - 1 bytes, and one multi-GiB frame is one multi-GiB
allocation on every hop. A tensor larger than the sender's ``chunk_bytes`` travels as
``ceil(nbytes / 2**k)`` frames of ``2**k`` bytes (the last shorter) in the same multipart message;
its descriptor's chunk shift says ``k`` (0: one frame), so the frame count and every frame's exact
size follow from the header, which the receiver bounds (``max_tensor_bytes``) before it allocates
anything. Each chunk is sealed on its own (shared/crypto/sealing.py: its own nonce, and associated
data naming the tensor, the chunk index and the count) and opened straight into its slice of one
preallocated buffer: no chunk is ever copied twice, and the receiver's memory is the payload plus
the frames it was handed.

The form is canonical, so a receiver can be strict: a tensor is chunked only if it needs at least
two chunks, with ``MIN_CHUNK_SHIFT <= k <= MAX_CHUNK_SHIFT`` and at most ``MAX_CHUNKS`` chunks; an
unchunked payload is at most ``2**MAX_CHUNK_SHIFT`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

MIN_CHUNK_SHIFT = 12  # 4 KiB: below that the per-frame overhead dominates (and tests use it)
MAX_CHUNK_SHIFT = 30  # 1 GiB: under cryptography's 2**31 - 1 bytes per AEAD call
MAX_CHUNKS = 1 << 16  # the chunk index is a u16 in the sealed chunk's nonce
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024


class Chunks(tuple):
    """The frames of one chunked payload, in order (what ``split_frames`` hands on for it)."""


def chunk_count(nbytes: int, shift: int) -> int:
    return 1 if shift == 0 else -(-nbytes // (1 << shift))


def check_chunk_shift(nbytes: int, shift: int, error: Callable[[str], Exception]) -> None:
    """Raise ``error(why)`` unless (nbytes, shift) is the canonical form described above."""
    if shift == 0:
        if nbytes > 1 << MAX_CHUNK_SHIFT:
            raise error(f"{nbytes} bytes in one frame (more than 2**{MAX_CHUNK_SHIFT}: chunk it)")
        return
    if not MIN_CHUNK_SHIFT <= shift <= MAX_CHUNK_SHIFT:
        raise error(f"chunk shift {shift} outside {MIN_CHUNK_SHIFT}..{MAX_CHUNK_SHIFT}")
    n = chunk_count(nbytes, shift)
    if n < 2:
        raise error(f"{nbytes} bytes chunked by 2**{shift}: one chunk (send it unchunked)")
    if n > MAX_CHUNKS:
        raise error(f"{n} chunks (at most {MAX_CHUNKS})")


def check_chunk_bytes(chunk_bytes: int) -> int:
    """A sender's chunk size: a power of two in the allowed range. Raises ValueError."""
    if chunk_bytes & (chunk_bytes - 1) or not (1 << MIN_CHUNK_SHIFT) <= chunk_bytes <= (1 << MAX_CHUNK_SHIFT):
        raise ValueError(f"chunk size must be a power of two in 2**{MIN_CHUNK_SHIFT}..2**{MAX_CHUNK_SHIFT}, "
                         f"not {chunk_bytes}")
    return chunk_bytes


def chunk_shift_for(nbytes: int, chunk_bytes: int) -> int:
    """The shift a sender with this chunk size uses for a payload of ``nbytes`` (0: unchunked)."""
    check_chunk_bytes(chunk_bytes)
    if nbytes <= chunk_bytes:
        return 0
    shift = chunk_bytes.bit_length() - 1
    if chunk_count(nbytes, shift) > MAX_CHUNKS:
        raise ValueError(f"{nbytes} bytes need more than {MAX_CHUNKS} chunks of {chunk_bytes}: raise the chunk size")
    return shift


def chunk_bounds(nbytes: int, shift: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk of a payload (one span when unchunked)."""
    if shift == 0:
        yield 0, nbytes
        return
    size = 1 << shift
    for start in range(0, nbytes, size):
        yield start, min(start + size, nbytes)


def chunk_views(view: memoryview, shift: int) -> list[memoryview]:
    """Zero-copy slices of a flat byte view, one per chunk."""
    return [view[a:b] for a, b in chunk_bounds(view.nbytes, shift)]


def join_chunks(nbytes: int, shift: int, frames: Sequence) -> memoryview:
    """Copy the chunks of an unsealed payload into one new buffer of ``nbytes`` (already bounded by
    the header; every frame's size already checked by ``split_frames``)."""
    import numpy as np  # here, not at the top: settings import this module and stay cheap to import

    out = memoryview(np.empty(nbytes, dtype=np.uint8))  # uninitialised: every byte is overwritten
    spans = list(chunk_bounds(nbytes, shift))
    if len(spans) != len(frames):
        raise ValueError(f"{len(frames)} chunk frames for {len(spans)} chunks")
    for (a, b), frame in zip(spans, frames):
        part = memoryview(frame)
        if part.ndim != 1 or part.format != "B":
            part = part.cast("B")
        if part.nbytes != b - a:
            raise ValueError(f"chunk of {part.nbytes} bytes, expected {b - a}")
        out[a:b] = part
    return out
