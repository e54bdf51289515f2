"""Wire format: a fixed binary header followed by the raw bytes of each tensor.

A message on the wire is a list of ZeroMQ frames (after any routing envelope):

    [header, payload frames of tensor 0, ..., of tensor n-1, (text)]

* header   -- ``HEADER`` struct (56 bytes) + one ``TENSOR_DESC`` (20 bytes) per tensor
              (shared/wire/header.py).
* payload  -- the tensor's bytes, C-contiguous, little-endian; sent zero-copy from the tensor's
              own memory. One frame, or, for a tensor larger than the sender's chunk size, one frame
              per chunk (shared/wire/chunks.py; the descriptor's chunk shift says so). When the
              SEALED flag is set, each frame is an AEAD ciphertext whose associated data is the
              header bytes (see ``shared.crypto.sealing``).
* text     -- present iff the HAS_TEXT flag is set: UTF-8, at most MAX_TEXT_BYTES (ERROR reason).

An int8/float8 tensor is a quantized hidden state followed by its bfloat16 scales
(shared/wire/compression.py); decoding turns the pair back into one float32 tensor.

Everything received is validated before use: signature, version, kind, identifiers, dtype codes,
dimensions, chunking, the number of frames and every frame's exact length. Sizes are bounded before
any allocation. A bad message raises ``FrameError`` with a short machine-readable ``reason`` that the
roles count (in Redis) and log; no role ever crashes on input.

This module keeps the names every caller imports (``shared.wire.wire.X``); the pieces live in
header.py (layout, validation), tensors.py, chunks.py, compression.py and schema.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from shared.wire.chunks import DEFAULT_CHUNK_BYTES, Chunks, chunk_shift_for, chunk_views
from shared.wire.compression import expand_tensors
from shared.wire.header import (  # noqa: F401  (re-exported: the wire's public names)
    DEFAULT_MAX_TENSOR_BYTES,
    FLAG_HAS_TEXT,
    FLAG_MORE,
    FLAG_SEALED,
    HEADER,
    KNOWN_FLAGS,
    TENSOR_DESC,
    FrameError,
    Header,
    TensorDesc,
    _id_from_wire,
    _id_to_wire,
    header_from_wire,
    header_to_wire,
)
from shared.wire.ids import check_id  # noqa: F401
from shared.wire.protocol import MAX_BUNDLE, MAX_TEXT_BYTES, SEAL_OVERHEAD, Kind
from shared.wire.schema import check_schema
from shared.wire.tensors import tensor_from_wire, tensor_to_wire  # noqa: F401


@dataclasses.dataclass
class Message:
    """A decoded message. ``tensors`` may alias received buffers: treat them as read-only."""

    kind: Kind
    run_id: str
    silo_id: str
    round: int = 0
    step: int = 0
    seq: int = 0
    tensors: list[torch.Tensor] = dataclasses.field(default_factory=list)
    text: str | None = None
    more: bool = False  # a FORWARD with more micro-batches of its step to follow (FLAG_MORE)


# ---------------------------------------------------------------- whole messages


def message_parts(msg: Message, flags: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
                  ) -> tuple[Header, bytes, list[memoryview], list[bytes]]:
    """(header, its bytes, one whole payload view per tensor, text frames): what sealing works on.
    A tensor larger than ``chunk_bytes`` is described as chunked (shared/wire/chunks.py)."""
    descs, payloads = [], []
    for t in msg.tensors:
        desc, buf = tensor_to_wire(t)
        descs.append(dataclasses.replace(desc, chunk_shift=chunk_shift_for(desc.nbytes, chunk_bytes)))
        payloads.append(buf)
    text_frames: list[bytes] = []
    if msg.text is not None:
        flags |= FLAG_HAS_TEXT
        text_frames.append(msg.text.encode("utf-8")[:MAX_TEXT_BYTES])
    if msg.more:
        flags |= FLAG_MORE
    header = Header(msg.kind, msg.run_id, msg.silo_id, msg.round, msg.step, msg.seq, flags, tuple(descs))
    return header, header_to_wire(header), payloads, text_frames


def message_to_wire(msg: Message, flags: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes | memoryview]:
    header, header_bytes, payloads, text_frames = message_parts(msg, flags, chunk_bytes)
    frames: list[bytes | memoryview] = [header_bytes]
    for desc, payload in zip(header.tensors, payloads):
        frames.extend(chunk_views(payload, desc.chunk_shift) if desc.chunk_shift else [payload])
    return [*frames, *text_frames]


SplitMessage = tuple[Header, bytes, list, str | None]  # (header, header bytes, payloads, text)


def split_frames(
    frames: Sequence[bytes | memoryview], max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    header: Header | None = None,
) -> SplitMessage:
    """Validate the frame list's structure; return (header, header bytes, payloads, text).

    Each payload is one frame, or a ``Chunks`` of frames for a chunked tensor; every frame's exact
    length is checked against the header. ``header``: the header already parsed from ``frames[0]``
    (by a receiver that looked at its kind first), so it is parsed once on its way in."""
    if not frames:
        raise FrameError("truncated", "empty message")
    header_bytes = bytes(frames[0])
    if header is None:
        header = header_from_wire(header_bytes, max_tensor_bytes)
    if len(frames) != header.n_frames:
        raise FrameError("frame_count", f"{len(frames)} frames, header says {header.n_frames}")
    overhead = SEAL_OVERHEAD if header.sealed else 0
    payloads, at = [], 1
    for i, desc in enumerate(header.tensors):
        n = desc.n_frames
        group = frames[at:at + n]
        for j, frame in enumerate(group):
            want = (min(desc.nbytes, (j + 1) << desc.chunk_shift) - (j << desc.chunk_shift)
                    if desc.chunk_shift else desc.nbytes) + overhead
            size = memoryview(frame).nbytes
            if size != want:
                where = f"payload {i}" + (f" chunk {j}/{n}" if desc.chunk_shift else "")
                raise FrameError("size_mismatch", f"{where}: {size} bytes, header says {want}")
        payloads.append(Chunks(group) if desc.chunk_shift else group[0])
        at += n
    text = None
    if header.has_text:
        raw = bytes(frames[-1])
        if len(raw) > MAX_TEXT_BYTES:
            raise FrameError("too_large", f"text of {len(raw)} bytes")
        text = raw.decode("utf-8", errors="replace")
    return header, header_bytes, payloads, text


def message_from_wire(
    frames: Sequence[bytes | memoryview], max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    split: SplitMessage | None = None,
) -> Message:
    """Decode an unsealed message (``split``: split_frames' result, if the caller has it).
    Raises FrameError on anything malformed."""
    header, _, payloads, text = split or split_frames(frames, max_tensor_bytes)
    if header.sealed:
        raise FrameError("sealed", "sealed payloads need a session (shared.crypto.sealing)")
    tensors = expand_tensors([tensor_from_wire(d, p) for d, p in zip(header.tensors, payloads)])
    msg = Message(header.kind, header.run_id, header.silo_id, header.round, header.step, header.seq, tensors, text,
                  header.more)
    check_schema(msg)
    return msg


# ---------------------------------------------------------------- bundles (client-batch)


def bundle_to_wire(bundle: Message, members: Sequence[Sequence[bytes | memoryview]]) -> list:
    """One BUNDLE header, then each member message's frames as they arrived (still sealed)."""
    if not 0 < len(members) <= MAX_BUNDLE:
        raise ValueError(f"a bundle holds 1..{MAX_BUNDLE} members, not {len(members)}")
    head = dataclasses.replace(bundle, kind=Kind.BUNDLE, seq=len(members), tensors=[], text=None)
    return [*message_to_wire(head), *(f for m in members for f in m)]


def bundle_from_wire(frames: Sequence[bytes | memoryview], max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
                     ) -> tuple[Header, list[list]]:
    """Split a BUNDLE into its members' frame lists (each still to be opened by a codec)."""
    if not frames:
        raise FrameError("truncated", "empty message")
    bundle = header_from_wire(frames[0], max_tensor_bytes)
    if bundle.kind != Kind.BUNDLE or bundle.tensors or bundle.has_text:
        raise FrameError("schema", "a bundle header is a BUNDLE without tensors or text")
    if not 0 < bundle.seq <= MAX_BUNDLE:
        raise FrameError("schema", f"bundle of {bundle.seq} members (1..{MAX_BUNDLE})")
    members, at = [], 1
    for _ in range(bundle.seq):
        if at >= len(frames):
            raise FrameError("frame_count", f"bundle says {bundle.seq} members, found {len(members)}")
        width = header_from_wire(frames[at], max_tensor_bytes).n_frames
        members.append(list(frames[at:at + width]))
        at += width
    if at != len(frames):
        raise FrameError("frame_count", f"{len(frames) - at} frames after the bundle's {bundle.seq} members")
    return bundle, members
