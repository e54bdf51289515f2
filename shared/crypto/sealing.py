"""End-to-end sealing between a silo and the trunk service: the AEAD frames of one session.

A session comes from the round's handshake (shared/crypto/handshake.py: the HELLO, the key schedule, the
ACK); this module seals and opens the frames under it, and writes the ACK's key confirmation.

Frames
------
``Session.seal`` takes a frame header (``shared.wire.wire``) and its plaintext payloads and returns the
frames to send: the header with FLAG_SEALED set and ``seq`` overwritten, then one ciphertext+tag per
payload. The header bytes are the AEAD associated data, so run, silo, round, step, kind, shapes and
dtypes are all authenticated; a frame cannot be spliced onto another header.

**The header's ``seq`` field carries the nonce counter** (it must be authenticated and the header
is the AAD): ``seq = sender_slot << 32 | counter``. Whatever ``seq`` the caller set is replaced.
``counter`` starts at 1 and strictly increases per (session, direction, sender slot). The slot
separates several senders under one key: every trunk worker seals trunk->silo frames with the same
session key, so each must use its own slot (``shared.crypto.enrollment.claim_sender_slot``; default: a random
31-bit slot). The nonce (12 bytes) is::

    direction label (3 bytes: b"S>T" or b"T>S") + payload index (1 byte) + seq (u64 LE)

Each direction also has its own key. The payload index in the nonce binds each payload to its
position: swapped payloads fail the tag. A payload larger than the sender's chunk size
(shared/wire/chunks.py) is sealed chunk by chunk, each chunk with its own nonce and associated data
that name its payload, index and the chunk count (shared/crypto/frame_units.py), and opened
straight into its slice of one buffer. The receiver keeps a replay window per sender slot
(``replay_window`` counters, default 64): duplicates and counters older than the window fail with
"replay". Window state changes only after a frame authenticates, so forgeries cannot burn
counters.

Failures raise ``SealError(reason)`` (a ``shared.wire.wire.FrameError``), reason one of: bad_hello,
bad_version, bad_cipher, wrong_run, wrong_round, unknown_silo, revoked, bad_hello_signature,
key_mismatch, stale_hello, fingerprint_mismatch, bad_ack, not_sealed, wrong_session, frame_count,
size_mismatch, bad_field, replay, bad_tag, counter_exhausted, too_many_senders.

Buffers: recent ``cryptography`` AEAD classes have ``encrypt_into``/``decrypt_into`` (50.0.2 is
installed here; pyproject's floor of 43 may lack them). We write ciphertext/plaintext straight
into one uninitialised buffer per payload (``numpy.empty``: no 16 MiB memset) or into
caller-provided ``out`` buffers (the codecs pass pooled ones: ``shared.wire.buffers``, so a training
step allocates no payload buffers once warm). Without them we fall back to ``encrypt``/``decrypt`` (one extra
allocation and copy per payload).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from shared.crypto.frame_units import sealed_frame_sizes, sealed_nbytes, units
from shared.crypto.keys import MAX_SLOTS, fingerprint
from shared.crypto.replay import ReplayWindow  # noqa: F401  (re-exported: part of this module's API)
from shared.wire.chunks import DEFAULT_CHUNK_BYTES, Chunks
from shared.wire.compression import expand_tensors
from shared.wire.protocol import SEAL_OVERHEAD
from shared.wire.wire import (
    FLAG_SEALED,
    HEADER,
    FrameError,
    Header,
    Message,
    SplitMessage,
    check_schema,
    header_from_wire,
    message_parts,
    split_frames,
    tensor_from_wire,
)

# ---------------------------------------------------------------- constants

CIPHERS = {"aes-gcm": 1, "chacha20": 2}
CIPHER_NAMES = {v: k for k, v in CIPHERS.items()}
_AEAD = {"aes-gcm": AESGCM, "chacha20": ChaCha20Poly1305}
HAS_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(ChaCha20Poly1305, "decrypt_into")

# The ACK (layout in shared/crypto/handshake.py) is written here: it is a session's key confirmation.
ACK_MAGIC, HANDSHAKE_VERSION = b"SPFA", 1
ACK = struct.Struct("<4sBBH32s32s")
ACK_SIZE = ACK.size  # 72
_ACK_CONTEXT = b"splitfed-ack-v1"

LABEL_S2T, LABEL_T2S = b"S>T", b"T>S"  # nonces and associated data per frame: shared/crypto/frame_units.py
MAX_COUNTER = 2**32 - 1
MAX_SENDERS = 1024  # receive windows per session (only authenticated senders create one)

# Byte offsets inside the frame header (shared.wire.wire.HEADER = "<4sBBBB16s16sIIQ"): flags is the
# 7th byte, seq the last 8. Checked at import so a header change cannot silently break sealing.
_FLAGS_OFFSET = 6
_SEQ_OFFSET = HEADER.size - 8
if not (HEADER.format.endswith("IIQ") and HEADER.format.startswith("<4sBBBB")):  # not an assert: -O drops those
    raise ImportError("shared.wire.wire's header layout changed: update the seq offset in shared.crypto.sealing")


class SealError(FrameError):
    """A handshake or sealed frame was refused; ``reason`` is a counter name (see module doc)."""


# ---------------------------------------------------------------- buffers


def _alloc(n: int) -> memoryview:
    # Uninitialised: the cipher overwrites every byte (bytearray(n) would memset 16 MiB first).
    return memoryview(np.empty(n, dtype=np.uint8))


def _byte_view(obj) -> memoryview:
    """A flat byte view of any C-contiguous buffer (zmq.Frame, numpy array, bytes) without copying."""
    v = memoryview(obj)
    return v if v.ndim == 1 and v.format == "B" else v.cast("B")


def _zero(buf) -> None:
    np.frombuffer(buf, dtype=np.uint8)[:] = 0


# ---------------------------------------------------------------- sessions


class Session:
    """One (silo, trunk service, run, round) session; the same class on both sides.

    Thread-safe: sealing reserves counters under a lock; opening holds the session's receive lock
    (one silo's frames are opened one at a time; different silos' sessions never contend).
    """

    def __init__(self, *, side: str, run_id: str, silo_id: str, round_no: int, cipher: str, okm: bytes,
                 transcript: bytes, trunk_public: bytes, silo_identity: bytes, sender_slot: int | None,
                 replay_window: int, max_tensor_bytes: int) -> None:
        k_s2t, k_t2s, self._k_confirm = okm[:32], okm[32:64], okm[64:96]
        aead = _AEAD[cipher]
        is_silo = side == "silo"
        self.side, self.run_id, self.silo_id, self.round, self.cipher = side, run_id, silo_id, round_no, cipher
        self.trunk_fingerprint = fingerprint(trunk_public)
        self.silo_fingerprint = fingerprint(silo_identity)
        self.transcript = transcript
        self._trunk_public = trunk_public
        self._send = aead(k_s2t if is_silo else k_t2s)
        self._recv = aead(k_t2s if is_silo else k_s2t)
        self._send_label = LABEL_S2T if is_silo else LABEL_T2S
        self._recv_label = LABEL_T2S if is_silo else LABEL_S2T
        if sender_slot is None:
            sender_slot = secrets.randbelow(MAX_SLOTS) + 1
        if not 0 <= sender_slot <= MAX_SLOTS:
            raise ValueError(f"sender slot must be in 0..{MAX_SLOTS}")
        self.sender_slot = sender_slot
        self._counter = 0
        self._send_lock, self._recv_lock = threading.Lock(), threading.Lock()
        self._windows: dict[int, ReplayWindow] = {}
        self._window_size = replay_window
        self.max_tensor_bytes = max_tensor_bytes
        # For `splitfed bench crypto` / step-time share: cumulative seconds inside the cipher.
        self.stats = {"sealed": 0, "opened": 0, "bytes_sealed": 0, "bytes_opened": 0, "seal_s": 0.0, "open_s": 0.0}

    def __repr__(self) -> str:
        return (f"Session({self.side}, run={self.run_id}, silo={self.silo_id}, round={self.round}, "
                f"cipher={self.cipher}, trunk={self.trunk_fingerprint[:19]}…)")

    # ---------------------------------------------------------- trunk side: key confirmation
    def ack(self) -> bytes:
        """The trunk's HELLO_ACK: its public key and proof that it derived this session's keys."""
        if self.side != "trunk":
            raise ValueError("only the trunk side answers a hello")
        return ACK.pack(ACK_MAGIC, HANDSHAKE_VERSION, CIPHERS[self.cipher], 0, self._trunk_public, self.confirm_tag())

    def confirm_tag(self) -> bytes:
        return hmac.new(self._k_confirm, _ACK_CONTEXT + self.transcript, hashlib.sha256).digest()

    # ---------------------------------------------------------- frames
    def _check_header(self, header: Header) -> None:
        if header.has_text:
            raise SealError("bad_field", "text frames cannot be sealed")
        if (header.run_id, header.silo_id, header.round) != (self.run_id, self.silo_id, self.round):
            raise SealError("wrong_session", f"frame for {header.run_id}/{header.silo_id}/round {header.round}, "
                                             f"session is {self.run_id}/{self.silo_id}/round {self.round}")

    def seal(self, header_bytes: bytes | memoryview, payloads: Sequence, out: Sequence | None = None) -> list:
        """Return ``[sealed header, ciphertext frames...]`` ready to send (see module doc for seq/nonce).

        ``payloads``: one whole plaintext per tensor; a tensor the header describes as chunked
        comes out as one frame per chunk, each sealed on its own (shared/crypto/frame_units.py).
        ``out``: optional writable buffers of ``sealed_nbytes`` each (reuse them only once the
        transport is done with the previous message: zmq's copy=False keeps a reference until sent).
        """
        header = header_from_wire(header_bytes, self.max_tensor_bytes)
        self._check_header(header)
        if len(payloads) != len(header.tensors):
            raise SealError("frame_count", f"{len(payloads)} payloads, header says {len(header.tensors)}")
        views = [_byte_view(p) for p in payloads]
        for i, (desc, v) in enumerate(zip(header.tensors, views)):
            if v.nbytes != desc.nbytes:
                raise SealError("size_mismatch", f"payload {i}: {v.nbytes} bytes, header says {desc.nbytes}")
        with self._send_lock:
            if self._counter >= MAX_COUNTER:
                raise SealError("counter_exhausted", "start a new session (rekey)")
            self._counter += 1
            seq = (self.sender_slot << 32) | self._counter
        aad = bytearray(header_bytes)
        aad[_FLAGS_OFFSET] |= FLAG_SEALED
        struct.pack_into("<Q", aad, _SEQ_OFFSET, seq)
        aad = bytes(aad)
        t0 = time.perf_counter()
        frames: list = [aad]
        for i, (desc, v) in enumerate(zip(header.tensors, views)):
            buf = _byte_view(out[i]) if out is not None else _alloc(sealed_nbytes(desc))
            for nonce, unit_aad, (a, b), (ca, cb) in units(self._send_label, i, desc, seq, aad):
                if HAS_INTO:
                    self._send.encrypt_into(nonce, v[a:b], unit_aad, buf[ca:cb])
                else:  # pragma: no cover - cryptography without encrypt_into
                    buf[ca:cb] = self._send.encrypt(nonce, bytes(v[a:b]), unit_aad)
                frames.append(buf[ca:cb] if desc.chunk_shift else buf)
        self.stats["seal_s"] += time.perf_counter() - t0
        self.stats["sealed"] += 1
        self.stats["bytes_sealed"] += sum(v.nbytes for v in views)
        return frames

    def open(self, header_bytes: bytes | memoryview, payloads: Sequence, out: Sequence | None = None,
             header: Header | None = None) -> list:
        """Authenticate and decrypt; return one plaintext buffer per payload (writable memoryviews).

        ``payloads``: one frame per tensor, or a ``Chunks`` of frames for a chunked one (as
        ``split_frames`` hands them on); each chunk is opened straight into its slice of the
        tensor's buffer. ``header``: the already-parsed header of these exact bytes (from
        ``split_frames``), to skip parsing twice. On any failure nothing is returned and the
        output buffers are zeroed (decryption writes plaintext before the tag is checked).
        """
        header_bytes = bytes(header_bytes)
        if header is None:
            header = header_from_wire(header_bytes, self.max_tensor_bytes)
        if not header.sealed:
            raise SealError("not_sealed", "expected a sealed frame")
        self._check_header(header)
        if len(payloads) != len(header.tensors):
            raise SealError("frame_count", f"{len(payloads)} payloads, header says {len(header.tensors)}")
        groups = [_frames_of(i, desc, p) for i, (desc, p) in enumerate(zip(header.tensors, payloads))]
        slot, counter = header.seq >> 32, header.seq & MAX_COUNTER
        if counter == 0:
            raise SealError("bad_field", "counter 0 is never sent")
        with self._recv_lock:
            window = self._windows.get(slot)
            if window is not None and (why := window.problem(counter)):
                raise SealError("replay", f"slot {slot}: {why}")
            if window is None and len(self._windows) >= MAX_SENDERS:
                raise SealError("too_many_senders", f"more than {MAX_SENDERS} sender slots in one session")
            t0 = time.perf_counter()
            bufs: list = []
            where = ""
            try:
                for i, (desc, frames) in enumerate(zip(header.tensors, groups)):
                    # The size comes from the header, bounded by max_tensor_bytes when it was parsed.
                    buf = _byte_view(out[i]) if out is not None else _alloc(desc.nbytes)
                    bufs.append(buf)
                    for j, (nonce, unit_aad, (a, b), _) in enumerate(units(self._recv_label, i, desc, header.seq,
                                                                           header_bytes)):
                        where = f"payload {i}" + (f" chunk {j}" if desc.chunk_shift else "")
                        if HAS_INTO:
                            self._recv.decrypt_into(nonce, frames[j], unit_aad, buf[a:b])
                        else:  # pragma: no cover
                            buf[a:b] = self._recv.decrypt(nonce, bytes(frames[j]), unit_aad)
            except InvalidTag:
                for b in bufs:
                    _zero(b)
                raise SealError("bad_tag", f"{self.silo_id} round {self.round}: {where} failed "
                                           "authentication") from None
            if window is None:
                window = self._windows[slot] = ReplayWindow(self._window_size)
            window.record(counter)
            self.stats["open_s"] += time.perf_counter() - t0
        self.stats["opened"] += 1
        self.stats["bytes_opened"] += sum(d.nbytes for d in header.tensors)
        return bufs


def _frames_of(i: int, desc, payload) -> list[memoryview]:
    """The frames of payload ``i``, each checked against the size the header gives it."""
    frames = list(payload) if isinstance(payload, Chunks) else [payload]
    if len(frames) != desc.n_frames or isinstance(payload, Chunks) != bool(desc.chunk_shift):
        raise SealError("frame_count", f"payload {i}: {len(frames)} frames, header says {desc.n_frames}")
    views = [_byte_view(f) for f in frames]
    for j, (v, size) in enumerate(zip(views, sealed_frame_sizes(desc))):
        if v.nbytes != size:
            raise SealError("size_mismatch", f"payload {i} frame {j}: {v.nbytes} bytes, header says {size}")
    return views


# ---------------------------------------------------------------- whole messages


def seal_message(session: Session, msg: Message, take: Callable[[int], memoryview] | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list:
    """Frames to send: the message's header and payloads (tensors larger than ``chunk_bytes``
    chunked), sealed. Text cannot be sealed (send ERRORs unsealed).

    ``take(nbytes)``: where the ciphertexts go (e.g. ``shared.wire.buffers.BufferPool.take``, so the hot
    path reuses its buffers); default a fresh buffer per payload.
    """
    if msg.text is not None:
        raise SealError("bad_field", "text frames cannot be sealed")
    header, header_bytes, payloads, _ = message_parts(msg, chunk_bytes=chunk_bytes)
    out = None
    if take is not None and HAS_INTO:
        out = [take(sealed_nbytes(d)) for d in header.tensors]
    return session.seal(header_bytes, payloads, out)


def open_message(session: Session, frames: Sequence, max_tensor_bytes: int | None = None,
                 take: Callable[[int], memoryview] | None = None, split: SplitMessage | None = None) -> Message:
    """Validate, authenticate, decrypt and schema-check a sealed message. ``seq`` is the nonce seq.

    ``take(nbytes)``: where the plaintexts go; the returned tensors alias those buffers.
    ``split``: split_frames' result, if the caller has it (the header is then not parsed again).
    Quantized hidden tensors (shared/wire/compression.py) come back as float32.
    """
    header, header_bytes, payloads, _ = split or split_frames(frames, max_tensor_bytes or session.max_tensor_bytes)
    out = [take(d.nbytes) for d in header.tensors] if take is not None and HAS_INTO else None
    bufs = session.open(header_bytes, payloads, out=out, header=header)
    tensors = expand_tensors([tensor_from_wire(d, b) for d, b in zip(header.tensors, bufs)])
    msg = Message(header.kind, header.run_id, header.silo_id, header.round, header.step, header.seq, tensors,
                  more=header.more)
    check_schema(msg)
    return msg
