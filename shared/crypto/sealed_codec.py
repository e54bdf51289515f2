"""Sealed codecs: the silo's and the trunk's side of end-to-end encryption, behind shared.wire.codec.

Handshake messages (HELLO, HELLO_ACK) and ERROR/control messages travel in the clear; every
message that carries training data is sealed with the session of its (silo, round). Receiving an
unsealed data message, or one for which no session exists, is a FrameError like any other bad frame.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from shared.wire.buffers import BufferPool
from shared.wire.chunks import DEFAULT_CHUNK_BYTES, check_chunk_bytes
from shared.wire.codec import check_wire_dtype
from shared.wire.compression import compress_message
from shared.wire.protocol import Kind
from shared.crypto.sealing import SealError, Session, open_message, seal_message
from shared.wire.wire import Message, SplitMessage, message_from_wire, message_to_wire, split_frames

# Aggregation messages are for the broker, which must read them: uploads are masked instead
# (shared/crypto/secure_agg.py), and a TRUNK_SYNC payload is sealed for the trunk service's workers.
CLEAR_KINDS = frozenset({Kind.READY, Kind.HEARTBEAT, Kind.ERROR, Kind.DISCONNECT, Kind.HELLO, Kind.HELLO_ACK,
                         Kind.AGG_JOIN, Kind.AGG_START, Kind.AGG_UPLOAD, Kind.AGG_RESULT,
                         Kind.ROUND_END, Kind.TRUNK_SYNC, Kind.ROUND_DONE, Kind.ROUND_CLOSED,
                         Kind.ROLLBACK, Kind.CHECKPOINTED, Kind.GENERATE_END,
                         Kind.PROGRESS})  # PROGRESS: for the broker to record, as Redis would have
KEEP_ROUNDS = 2  # sessions of the current and the previous round (late replies of the last round)


class SessionTable:
    """Sessions by (silo, round); older rounds are forgotten as new ones arrive (rekey per round)."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, int], Session] = {}
        self.retired_crypto_s = 0.0  # cipher time of forgotten sessions, for the crypto share

    def add(self, session: Session) -> None:
        self._sessions[(session.silo_id, session.round)] = session
        stale = [k for k in self._sessions if k[0] == session.silo_id and k[1] <= session.round - KEEP_ROUNDS]
        for k in stale:
            old = self._sessions.pop(k)
            self.retired_crypto_s += old.stats["seal_s"] + old.stats["open_s"]

    def get(self, silo_id: str, round_no: int) -> Session:
        session = self._sessions.get((silo_id, round_no))
        if session is None:
            raise SealError("no_session", f"no session for {silo_id} round {round_no} (send a HELLO first)")
        return session

    def all(self) -> list[Session]:
        return list(self._sessions.values())


class SealedCodec:
    """Seals data messages with the session of (msg.silo_id, msg.round); opens likewise.

    ``wire_dtype``: int8 / fp8-* quantize each data message's hidden tensor before it is sealed
    (values and scales are both sealed payloads); ``chunk_bytes``: larger tensors are sealed in
    chunks (shared/wire/codec.py says more)."""

    def __init__(self, max_tensor_bytes: int, wire_dtype: str = "fp32", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.wire_dtype = check_wire_dtype(wire_dtype)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.sessions = SessionTable()
        # One pool per direction: ciphertexts we send, plaintexts we open (see shared/wire/buffers.py for
        # why a buffer still held by ZeroMQ or by an autograd graph is never reused).
        self.send_buffers = BufferPool()
        self.recv_buffers = BufferPool()
        self.encode_s = 0.0  # cumulative, crypto included: `splitfed bench step` splits it out
        self.decode_s = 0.0

    def encode(self, msg: Message) -> list:
        t0 = time.perf_counter()
        if msg.kind in CLEAR_KINDS:
            frames = message_to_wire(msg, chunk_bytes=self.chunk_bytes)
        else:
            frames = seal_message(self.sessions.get(msg.silo_id, msg.round), compress_message(msg, self.wire_dtype),
                                  self.send_buffers.take, self.chunk_bytes)
        self.encode_s += time.perf_counter() - t0
        return frames

    def decode(self, frames: Sequence, split: SplitMessage | None = None) -> Message:
        """``split``: split_frames' result, if the caller has it (the header is parsed once)."""
        t0 = time.perf_counter()
        try:
            split = split or split_frames(frames, self.max_tensor_bytes)
            header = split[0]
            if not header.sealed:
                if header.kind not in CLEAR_KINDS:
                    raise SealError("not_sealed", f"{header.kind.name} must be sealed")
                return message_from_wire(frames, self.max_tensor_bytes, split)
            return open_message(self.sessions.get(header.silo_id, header.round), frames, self.max_tensor_bytes,
                                self.recv_buffers.take, split)
        finally:
            self.decode_s += time.perf_counter() - t0

    def allocations(self) -> int:
        """Large payload buffers allocated so far: flat across steps once the pools are warm."""
        return self.send_buffers.allocations + self.recv_buffers.allocations

    def crypto_seconds(self) -> float:
        live = sum(s.stats["seal_s"] + s.stats["open_s"] for s in self.sessions.all())
        return self.sessions.retired_crypto_s + live
