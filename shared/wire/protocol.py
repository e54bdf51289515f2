"""Protocol constants shared by every role: message kinds, wire dtypes, limits.

One small module so that a reader sees the whole vocabulary of the wire at a glance
(the ZeroMQ guide's Majordomo keeps its constants the same way).
"""

from __future__ import annotations

import dataclasses
import enum

import torch

SIGNATURE = b"SPFD"
PROTOCOL_VERSION = 2  # 2: chunked payloads (chunk shift in the tensor descriptor), int8/fp8 dtypes

MAX_TENSORS = 4
MAX_NDIM = 4
MAX_TEXT_BYTES = 4096  # ERROR reasons and READY details
MAX_BUNDLE = 256  # members of one client-batch trunk batch
MAX_HANDSHAKE_BYTES = 256  # HELLO (196) and HELLO_ACK (72) payloads
SEAL_OVERHEAD = 16  # AEAD tag appended to each sealed payload (AES-GCM and ChaCha20-Poly1305)


class Kind(enum.IntEnum):
    """Message kinds and the frames each carries after the header (see shared/wire/wire.py).

    READY            peer -> broker: register (silo_id = the silo, or the worker id for a trunk
                     worker); broker -> peer: accepted. A silo's READY carries its signed
                     registration token, uint8[120] (shared/crypto/registration.py) when encryption is on.
                     Text (peer -> broker): "incarnation=<hex>" and a line "config=<digest> <json>",
                     the peer's run config (shared/state/run_config.py); one that differs is refused.
    HEARTBEAT        either way, no tensors: liveness.
    FORWARD          silo -> trunk: hidden h1 float[B,T,H], mask uint8[B,T], positions int[B,T].
                     Flag MORE: a micro-batch of the step, more of its pieces follow.
    FORWARD_RESULT   trunk -> silo: hidden h2 float[B,T,H].
    BACKWARD         silo -> trunk: dL/dh2 float[B,T,H].
    BACKWARD_RESULT  trunk -> silo: dL/dh1 float[B,T,H], counters int64[2]: the trunk's update
                     counter after this step (the order in which steps were applied) and its compute
                     time for this piece in microseconds (what a silo sizes its micro-batches by);
                     int64[1] (the counter alone) is accepted too.
    ERROR            either way: no tensors, text = reason (the step named by round/step failed).
                     Never sealed (it carries no data), so a silo can learn why it was refused.
    DISCONNECT       silo -> broker: finished, leave the rotation. broker -> trunk worker: every
                     silo of the run has finished (a --burst worker exits 0). No tensors.
    HELLO            silo -> trunk service (the broker fans it out to every worker): the round's
                     signed handshake (shared/crypto/handshake.py), uint8[196]. Unsealed. Text: the silo's
                     "config=<digest> <json>" line; the signature covers the digest.
    HELLO_ACK        trunk -> silo: uint8[72], the trunk key and its key confirmation. Unsealed.
    GENERATE         silo -> trunk: one step of split generation (shared/model/generation.py), frames as
                     FORWARD: hidden h1 float[B,T,H], mask uint8[B,T], positions int[B,T]; step = the
                     token index, 0 the prompt (T tokens; it opens a new KV cache), then T = 1.
                     Served outside the training schedule, by the worker holding the silo's cache.
    GENERATE_RESULT  trunk -> silo: hidden h2 float[B,T,H] of the same positions.
    GENERATE_END     silo -> trunk: no tensors; the generation is over, free its cache. Unsealed
                     (it carries no data; the broker only accepts it from the silo's connection).
    PROGRESS         silo -> broker: no tensors; text = the silo's report (shared/wire/control_text.py
                     SiloReport: who it is at start, its latest step and loss, its status at the
                     end, frames it rejected). The broker records it in Redis: silos reach no Redis.

    Client-batch mode:
    BUNDLE           broker -> trunk: seq = n; followed in the same multipart message by n
                     members' FORWARD messages (each whole: header, payloads), one trunk batch.

    Rounds and aggregation (shared/crypto/secure_agg.py; texts typed in shared/wire/control_text.py):
    AGG_JOIN         silo -> broker: the silo's steps of this round are done; text = "weight=N",
                     its sample count (the FedAvg weight, public like the `samples` field in Redis).
    AGG_START        broker -> silo: text = "attempt=K;silo0,silo1" (AggStart: the attempt and its
                     participants);
                     uint8[N], the participants' enrolled keys and certificates (shared/crypto/peer_keys.py),
                     which the silo verifies against its pinned operator key before masking with them.
    AGG_UPLOAD       silo -> broker: int64[D+1], the masked weighted parameters and weight;
                     text = "attempt=K" (AggAttempt).
    AGG_RESULT       broker -> silo: int64[D+1], the sum of the attempt's uploads; text = "attempt=K".
    ROUND_END        broker -> trunk (hierarchical mode): text = "worker,...;silo:weight,..."
                     (the workers that average, and every participating silo's weight).
    TRUNK_SYNC       trunk -> broker -> every averaging worker: uint8[N], a worker's weighted
                     partial sum of its silos' trunk adapters, sealed with the trunk service key:
                     nonce(12) | weight float64(8, authenticated) | AES-GCM(partial float64[D]) | tag(16).
    ROUND_DONE       trunk -> broker: this worker has applied the round's trunk average (if any)
                     and written its round checkpoint.
    ROUND_CLOSED     broker -> silo: the round is over without an aggregate for this silo
                     (aggregation off, too few participants, or it joined late).

    Recovery (shared/state/checkpoint.py); text = the round to roll back to (-1: the initial state):
    ROLLBACK         broker -> silos and workers: a role restarted; load your checkpoint of that
                     round and continue from the next round's first step.
    CHECKPOINTED     silo -> broker: this silo's checkpoint of `round` is on disk.

    Every structured text above (READY's incarnation and resume point, ROLLBACK's round,
    ROUND_END's workers and weights, AGG_START's participants) is written and read only by its
    type in shared/wire/control_text.py.

    With encryption on, FORWARD..BACKWARD_RESULT are sealed: each payload is an AEAD ciphertext,
    the header is the associated data, and the header's seq carries the nonce counter.
    """

    READY = 1
    HEARTBEAT = 2
    FORWARD = 3
    FORWARD_RESULT = 4
    BACKWARD = 5
    BACKWARD_RESULT = 6
    ERROR = 7
    DISCONNECT = 8
    HELLO = 9
    HELLO_ACK = 10
    BUNDLE = 11
    AGG_JOIN = 12
    AGG_START = 13
    AGG_UPLOAD = 14
    AGG_RESULT = 15
    ROUND_END = 16
    TRUNK_SYNC = 17
    ROUND_DONE = 18
    ROUND_CLOSED = 19
    ROLLBACK = 20
    CHECKPOINTED = 21
    GENERATE = 22
    GENERATE_RESULT = 23
    GENERATE_END = 24
    PROGRESS = 25


GENERATION_KINDS = frozenset({Kind.GENERATE, Kind.GENERATE_END})  # silo -> trunk, outside the scheduler


class Reason(str, enum.Enum):
    """The ERROR reasons a receiver acts on. Every other reason is a frame-rejection counter name
    (shared/wire/wire.py FrameError, the trunk's StepError), shown and counted, never acted on."""

    CONFIG_MISMATCH = "config_mismatch"  # the peer's run config differs: stop, say which fields
    REGISTER = "register"  # the broker does not know the sender: register again
    STRAGGLER = "straggler"  # client-batch: the step's trunk batch left without this silo
    RETRY = "retry"  # the step was lost with its trunk worker: send it again
    DUPLICATE = "duplicate"  # a second FORWARD for a step already queued
    IDENTITY_TAKEN = "identity_taken"  # a live connection holds this silo id: retry READY after liveness_ttl_s


@dataclasses.dataclass(frozen=True)
class ErrorReason:
    """An ERROR's text, typed: ``name`` (a Reason's value or a counter name) and a free ``detail``.

    On the wire it is "name: detail" (or "name"); to_text and from_text are the one mirrored pair
    that writes and reads it, so no role matches ERROR text by prefix.
    """

    name: str
    detail: str = ""

    @property
    def code(self) -> Reason | None:
        """The Reason a receiver acts on, or None for a plain rejection."""
        try:
            return Reason(self.name)
        except ValueError:
            return None

    def to_text(self) -> str:
        return f"{self.name}: {self.detail}" if self.detail else self.name

    @classmethod
    def from_text(cls, text: str | None) -> ErrorReason:
        name, _, detail = (text or "").partition(": ")
        return cls(name.strip(), detail)

    @classmethod
    def of(cls, reason: Reason | str, detail: str = "") -> ErrorReason:
        return cls(reason.value if isinstance(reason, Reason) else reason, detail)


class WireDtype(enum.IntEnum):
    FLOAT32 = 1
    BFLOAT16 = 2
    FLOAT16 = 3
    INT64 = 4
    INT32 = 5
    UINT8 = 6
    # Quantized hidden tensors (shared/wire/compression.py): always followed by their scales.
    INT8 = 7
    FLOAT8_E4M3 = 8
    FLOAT8_E5M2 = 9


TORCH_DTYPE = {
    WireDtype.FLOAT32: torch.float32,
    WireDtype.BFLOAT16: torch.bfloat16,
    WireDtype.FLOAT16: torch.float16,
    WireDtype.INT64: torch.int64,
    WireDtype.INT32: torch.int32,
    WireDtype.UINT8: torch.uint8,
    WireDtype.INT8: torch.int8,
    WireDtype.FLOAT8_E4M3: torch.float8_e4m3fn,
    WireDtype.FLOAT8_E5M2: torch.float8_e5m2,
}
WIRE_DTYPE = {v: k for k, v in TORCH_DTYPE.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in TORCH_DTYPE.items()}
FLOAT_WIRE_DTYPES = frozenset({WireDtype.FLOAT32, WireDtype.BFLOAT16, WireDtype.FLOAT16})

# The dtype a role casts h1/h2 and their gradients to before its codec encodes them. For the
# quantized wire formats (int8, fp8-*) that is fp32: the codec quantizes from full precision
# (shared/wire/compression.py), and the receiver's codec hands back fp32.
WIRE_DTYPE_BY_NAME = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                      "int8": torch.float32, "fp8-e4m3": torch.float32, "fp8-e5m2": torch.float32,
                      "auto8": torch.float32}

# A trunk worker also heartbeats from a thread of its own, on a second connection whose identity is
# its worker id + this suffix (trunk_worker/beacon.py): a worker busy in a long step stays alive.
BEACON_SUFFIX = "/beacon"
# Silent broker heartbeats after which a silo or worker says the broker looks down (Paranoid Pirate).
BROKER_LIVENESS = 3
