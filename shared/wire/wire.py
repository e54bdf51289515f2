"""Wire format: a fixed binary header followed by one raw buffer per tensor.

A message on the wire is a list of ZeroMQ frames (after any routing envelope):

    [header, payload_0, ..., payload_{n-1}, (text)]

* header   -- ``HEADER`` struct (56 bytes) + one ``TENSOR_DESC`` (20 bytes) per tensor.
* payload  -- the tensor's bytes, C-contiguous, little-endian; sent zero-copy from the tensor's
              own memory. When the SEALED flag is set, each payload is an AEAD ciphertext whose
              associated data is the header bytes (see ``shared.crypto.sealing``).
* text     -- present iff the HAS_TEXT flag is set: UTF-8, at most MAX_TEXT_BYTES (ERROR reason).

Everything received is validated before use: signature, version, kind, identifiers, dtype codes,
dimensions, the number of frames and every frame's exact length. Sizes are bounded before any
allocation. A bad message raises ``FrameError`` with a short machine-readable ``reason`` that the
roles count (in Redis) and log; no role ever crashes on input.

No pickle, no torch.load: a tensor is rebuilt only from (dtype code, shape, raw bytes).
"""

from __future__ import annotations

import dataclasses
import re
import struct
import warnings
from collections.abc import Sequence

import torch

from shared.wire.ids import ID_FIELD_BYTES, check_id
from shared.wire.protocol import (
    FLOAT_WIRE_DTYPES,
    ITEMSIZE,
    MAX_BUNDLE,
    MAX_HANDSHAKE_BYTES,
    MAX_NDIM,
    MAX_TENSORS,
    MAX_TEXT_BYTES,
    PROTOCOL_VERSION,
    SEAL_OVERHEAD,
    SIGNATURE,
    TORCH_DTYPE,
    WIRE_DTYPE,
    Kind,
    WireDtype,
)

# signature, version, kind, flags, n_tensors, run_id, silo_id, round, step, seq
HEADER = struct.Struct(f"<4sBBBB{ID_FIELD_BYTES}s{ID_FIELD_BYTES}sIIQ")
# dtype code, ndim, 2 pad bytes, MAX_NDIM dims (unused dims are 0)
TENSOR_DESC = struct.Struct(f"<BB2x{MAX_NDIM}I")

FLAG_SEALED = 1
FLAG_HAS_TEXT = 2
KNOWN_FLAGS = FLAG_SEALED | FLAG_HAS_TEXT

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

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


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
        dims = list(desc.shape) + [0] * (MAX_NDIM - len(desc.shape))
        parts.append(TENSOR_DESC.pack(int(desc.dtype), len(desc.shape), *dims))
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
    if n_tensors > MAX_TENSORS:
        raise FrameError("too_large", f"{n_tensors} tensors")
    expected = HEADER.size + n_tensors * TENSOR_DESC.size
    if len(raw) != expected:
        raise FrameError("truncated" if len(raw) < expected else "bad_field", f"header {len(raw)} != {expected} bytes")
    descs = []
    for i in range(n_tensors):
        code, ndim, *dims = TENSOR_DESC.unpack_from(raw, HEADER.size + i * TENSOR_DESC.size)
        try:
            dtype = WireDtype(code)
        except ValueError as exc:
            raise FrameError("bad_field", f"dtype code {code}") from exc
        if ndim > MAX_NDIM or any(dims[ndim:]):
            raise FrameError("bad_field", f"ndim {ndim} dims {dims}")
        desc = TensorDesc(dtype, tuple(dims[:ndim]))
        # Bounded before anything is allocated or trusted.
        if desc.nbytes > max_tensor_bytes:
            raise FrameError("too_large", f"tensor {i}: {desc.nbytes} bytes > {max_tensor_bytes}")
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


# ---------------------------------------------------------------- tensors


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
    # numpy has no bfloat16: view the same memory as raw bytes (keeps the tensor alive via .base).
    raw = t.reshape(-1).view(torch.uint8).numpy()
    return desc, memoryview(raw)


# Received buffers can be read-only; we never write into them (see Message docstring). Silenced
# here once, for this module only: a catch_warnings() per tensor would reset every module's
# "warn once" memory each step, so unrelated warnings would repeat in the logs at every step.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=re.escape(__name__) + "$")


def tensor_from_wire(desc: TensorDesc, buf: bytes | bytearray | memoryview) -> torch.Tensor:
    """Rebuild a tensor from its description and raw bytes. The length must match exactly."""
    view = memoryview(buf)
    if view.nbytes != desc.nbytes:
        raise FrameError("size_mismatch", f"payload {view.nbytes} bytes, header says {desc.nbytes}")
    dtype = TORCH_DTYPE[desc.dtype]
    if desc.nbytes == 0:
        return torch.empty(desc.shape, dtype=dtype)
    flat = torch.frombuffer(view, dtype=dtype)  # may be read-only: see the filter above
    return flat.view(desc.shape)


# ---------------------------------------------------------------- whole messages


def message_to_wire(msg: Message, flags: int = 0) -> list[bytes | memoryview]:
    descs, payloads = [], []
    for t in msg.tensors:
        desc, buf = tensor_to_wire(t)
        descs.append(desc)
        payloads.append(buf)
    text_frames: list[bytes | memoryview] = []
    if msg.text is not None:
        flags |= FLAG_HAS_TEXT
        text_frames.append(msg.text.encode("utf-8")[:MAX_TEXT_BYTES])
    header = Header(msg.kind, msg.run_id, msg.silo_id, msg.round, msg.step, msg.seq, flags, tuple(descs))
    return [header_to_wire(header), *payloads, *text_frames]


SplitMessage = tuple[Header, bytes, list, str | None]  # (header, header bytes, payload frames, text)


def split_frames(
    frames: Sequence[bytes | memoryview], max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    header: Header | None = None,
) -> SplitMessage:
    """Validate the frame list's structure; return (header, header bytes, payload frames, text).

    ``header``: the header already parsed from ``frames[0]`` (by a receiver that looked at its kind
    first), so it is parsed once on its way in."""
    if not frames:
        raise FrameError("truncated", "empty message")
    header_bytes = bytes(frames[0])
    if header is None:
        header = header_from_wire(header_bytes, max_tensor_bytes)
    want = 1 + len(header.tensors) + (1 if header.has_text else 0)
    if len(frames) != want:
        raise FrameError("frame_count", f"{len(frames)} frames, header says {want}")
    payloads = list(frames[1 : 1 + len(header.tensors)])
    overhead = SEAL_OVERHEAD if header.sealed else 0
    for i, (desc, payload) in enumerate(zip(header.tensors, payloads)):
        size = memoryview(payload).nbytes
        if size != desc.nbytes + overhead:
            raise FrameError("size_mismatch", f"payload {i}: {size} bytes, header says {desc.nbytes + overhead}")
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
    tensors = [tensor_from_wire(d, p) for d, p in zip(header.tensors, payloads)]
    msg = Message(header.kind, header.run_id, header.silo_id, header.round, header.step, header.seq, tensors, text)
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
        head = header_from_wire(frames[at], max_tensor_bytes)
        width = 1 + len(head.tensors) + (1 if head.has_text else 0)
        members.append(list(frames[at:at + width]))
        at += width
    if at != len(frames):
        raise FrameError("frame_count", f"{len(frames) - at} frames after the bundle's {bundle.seq} members")
    return bundle, members


# ---------------------------------------------------------------- per-kind schema

_HIDDEN = "hidden"


def check_schema(msg: Message) -> None:
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
        if t[1].dtype != torch.int64 or tuple(t[1].shape) != (1,):
            raise FrameError("schema", f"applied counter must be int64 [1], got {t[1].dtype} {tuple(t[1].shape)}")
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
