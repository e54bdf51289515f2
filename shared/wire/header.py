"""The fixed binary header of every message: layout, parsing and validation.

    HEADER       56 bytes: signature, version, kind, flags, tensor count, run id, silo id, round,
                 step, seq (shared/wire/wire.py documents the whole message).
    TENSOR_DESC  20 bytes per tensor: dtype code, ndim, chunk shift, one zero pad byte, four u32
                 dims (unused = 0). Chunk shift 0: the payload is one frame; k: it travels as
                 ceil(nbytes / 2**k) frames of 2**k bytes, the last one shorter
                 (shared/wire/chunks.py).

Everything is validated before it is trusted, and every size is bounded before anything is
allocated: a header that announces a tensor larger than ``max_tensor_bytes``, or more chunks than
the protocol allows, is refused here, so no receiver ever allocates what an attacker announced.
"""

from __future__ import annotations

import dataclasses
import struct

from shared.wire.chunks import check_chunk_shift, chunk_count
from shared.wire.ids import ID_FIELD_BYTES, check_id
from shared.wire.protocol import ITEMSIZE, MAX_NDIM, MAX_TENSORS, PROTOCOL_VERSION, SIGNATURE, Kind, WireDtype

# signature, version, kind, flags, n_tensors, run_id, silo_id, round, step, seq
HEADER = struct.Struct(f"<4sBBBB{ID_FIELD_BYTES}s{ID_FIELD_BYTES}sIIQ")
# dtype code, ndim, chunk shift, 1 pad byte (0), MAX_NDIM dims (unused dims are 0)
TENSOR_DESC = struct.Struct(f"<BBBx{MAX_NDIM}I")

FLAG_SEALED = 1
FLAG_HAS_TEXT = 2
# A FORWARD that is not its step's last piece: more micro-batches of the step follow
# (silo_agent/microbatch.py). In the header, so the broker can group pieces into trunk batches
# without opening them, and authenticated with it (it is part of the sealed frames' associated data).
FLAG_MORE = 4
KNOWN_FLAGS = FLAG_SEALED | FLAG_HAS_TEXT | FLAG_MORE

DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024


class FrameError(ValueError):
    """A received message was rejected. ``reason`` is a short counter name, ``detail`` for logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class TensorDesc:
    dtype: WireDtype
    shape: tuple[int, ...]
    chunk_shift: int = 0  # 0: one payload frame; k: frames of 2**k bytes (shared/wire/chunks.py)

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @property
    def n_frames(self) -> int:
        return chunk_count(self.nbytes, self.chunk_shift)


@dataclasses.dataclass(frozen=True)
class Header:
    kind: Kind
    run_id: str
    silo_id: str
    round: int = 0
    step: int = 0
    seq: int = 0
    flags: int = 0
    tensors: tuple[TensorDesc, ...] = ()

    @property
    def sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def has_text(self) -> bool:
        return bool(self.flags & FLAG_HAS_TEXT)

    @property
    def more(self) -> bool:
        return bool(self.flags & FLAG_MORE)

    @property
    def n_frames(self) -> int:
        """Frames of the whole message: header, every payload frame (chunks counted), text."""
        return 1 + sum(d.n_frames for d in self.tensors) + (1 if self.has_text else 0)


# ---------------------------------------------------------------- identifiers


def _id_to_wire(value: str) -> bytes:
    return value.encode("ascii").ljust(ID_FIELD_BYTES, b"\0")


def _id_from_wire(raw: bytes, what: str) -> str:
    text = raw.rstrip(b"\0")
    try:
        value = text.decode("ascii")
        return check_id(value, what)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError("bad_field", f"{what} {raw!r}") from exc


# ---------------------------------------------------------------- header


def header_to_wire(header: Header) -> bytes:
    if len(header.tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} tensors per message")
    parts = [
        HEADER.pack(
            SIGNATURE,
            PROTOCOL_VERSION,
            int(header.kind),
            header.flags,
            len(header.tensors),
            _id_to_wire(check_id(header.run_id, "run id")),
            _id_to_wire(check_id(header.silo_id, "silo id")),
            header.round,
            header.step,
            header.seq,
        )
    ]
    for desc in header.tensors:
        if len(desc.shape) > MAX_NDIM:
            raise ValueError(f"at most {MAX_NDIM} dimensions per tensor")
        check_chunk_shift(desc.nbytes, desc.chunk_shift, ValueError)
        dims = list(desc.shape) + [0] * (MAX_NDIM - len(desc.shape))
        parts.append(TENSOR_DESC.pack(int(desc.dtype), len(desc.shape), desc.chunk_shift, *dims))
    return b"".join(parts)


def header_from_wire(raw: bytes | memoryview, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> Header:
    raw = bytes(raw)
    if len(raw) < HEADER.size:
        raise FrameError("truncated", f"header of {len(raw)} bytes")
    sig, version, kind, flags, n_tensors, run_id, silo_id, rnd, step, seq = HEADER.unpack_from(raw)
    if sig != SIGNATURE:
        raise FrameError("bad_signature", repr(sig))
    if version != PROTOCOL_VERSION:
        raise FrameError("bad_version", f"got {version}, speak {PROTOCOL_VERSION}")
    try:
        kind = Kind(kind)
    except ValueError as exc:
        raise FrameError("bad_kind", str(kind)) from exc
    if flags & ~KNOWN_FLAGS:
        raise FrameError("bad_field", f"unknown flags {flags:#x}")
    if flags & FLAG_MORE and kind != Kind.FORWARD:
        raise FrameError("bad_field", f"{kind.name} cannot say more pieces follow (only a FORWARD is cut in pieces)")
    if n_tensors > MAX_TENSORS:
        raise FrameError("too_large", f"{n_tensors} tensors")
    expected = HEADER.size + n_tensors * TENSOR_DESC.size
    if len(raw) != expected:
        raise FrameError("truncated" if len(raw) < expected else "bad_field", f"header {len(raw)} != {expected} bytes")
    descs = []
    for i in range(n_tensors):
        at = HEADER.size + i * TENSOR_DESC.size
        code, ndim, shift, *dims = TENSOR_DESC.unpack_from(raw, at)
        try:
            dtype = WireDtype(code)
        except ValueError as exc:
            raise FrameError("bad_field", f"dtype code {code}") from exc
        if ndim > MAX_NDIM or any(dims[ndim:]):
            raise FrameError("bad_field", f"ndim {ndim} dims {dims}")
        if raw[at + 3] != 0:  # the pad byte: a reserved field stays zero, so it can gain a meaning later
            raise FrameError("bad_field", f"tensor {i}: pad byte {raw[at + 3]}")
        desc = TensorDesc(dtype, tuple(dims[:ndim]), shift)
        # Bounded before anything is allocated or trusted.
        if desc.nbytes > max_tensor_bytes:
            raise FrameError("too_large", f"tensor {i}: {desc.nbytes} bytes > {max_tensor_bytes}")
        check_chunk_shift(desc.nbytes, shift, lambda why: FrameError("bad_field", f"tensor {i}: {why}"))
        descs.append(desc)
    return Header(
        kind=kind,
        run_id=_id_from_wire(run_id, "run id"),
        silo_id=_id_from_wire(silo_id, "silo id"),
        round=rnd,
        step=step,
        seq=seq,
        flags=flags,
        tensors=tuple(descs),
    )
