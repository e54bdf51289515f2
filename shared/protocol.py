"""Protocol constants shared by every role: message kinds, wire dtypes, limits.

One small module so that a reader sees the whole vocabulary of the wire at a glance
(the ZeroMQ guide's Majordomo keeps its constants the same way).
"""

from __future__ import annotations

import enum

import torch

SIGNATURE = b"SPFD"
PROTOCOL_VERSION = 1

# Identifiers are fixed-width fields in the header: short ASCII names keep it small and fixed-size.
from shared.ids import ID_ALPHABET, ID_FIELD_BYTES  # noqa: E402,F401  (re-exported)

MAX_TENSORS = 4
MAX_NDIM = 4
MAX_TEXT_BYTES = 4096  # ERROR reasons and READY details
MAX_HANDSHAKE_BYTES = 256  # HELLO (196) and HELLO_ACK (72) payloads
SEAL_OVERHEAD = 16  # AEAD tag appended to each sealed payload (AES-GCM and ChaCha20-Poly1305)


class Kind(enum.IntEnum):
    """Message kinds and the frames each carries after the header (see shared/wire.py).

    READY            peer -> broker: register (silo_id = the silo, or the worker id for a trunk
                     worker); broker -> peer: accepted. A silo's READY carries its signed
                     registration token, uint8[120] (shared/registration.py) when encryption is on.
    HEARTBEAT        either way, no tensors: liveness.
    FORWARD          silo -> trunk: hidden h1 float[B,T,H], mask uint8[B,T], positions int[B,T].
    FORWARD_RESULT   trunk -> silo: hidden h2 float[B,T,H].
    BACKWARD         silo -> trunk: dL/dh2 float[B,T,H].
    BACKWARD_RESULT  trunk -> silo: dL/dh1 float[B,T,H], applied int64[1] (the trunk's update
                     counter after this step: the order in which steps were applied).
    ERROR            either way: no tensors, text = reason (the step named by round/step failed).
                     Never sealed (it carries no data), so a silo can learn why it was refused.
    DISCONNECT       silo -> broker: finished, leave the rotation. No tensors.
    HELLO            silo -> trunk service (the broker fans it out to every worker): the round's
                     signed handshake (shared/sealing.py), uint8[196]. Unsealed.
    HELLO_ACK        trunk -> silo: uint8[72], the trunk key and its key confirmation. Unsealed.

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


class Flag(enum.IntFlag):
    NONE = 0
    SEALED = 1  # payload frames are AEAD ciphertexts (set by the sealing layer)


class WireDtype(enum.IntEnum):
    FLOAT32 = 1
    BFLOAT16 = 2
    FLOAT16 = 3
    INT64 = 4
    INT32 = 5
    UINT8 = 6


TORCH_DTYPE = {
    WireDtype.FLOAT32: torch.float32,
    WireDtype.BFLOAT16: torch.bfloat16,
    WireDtype.FLOAT16: torch.float16,
    WireDtype.INT64: torch.int64,
    WireDtype.INT32: torch.int32,
    WireDtype.UINT8: torch.uint8,
}
WIRE_DTYPE = {v: k for k, v in TORCH_DTYPE.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in TORCH_DTYPE.items()}
FLOAT_WIRE_DTYPES = frozenset({WireDtype.FLOAT32, WireDtype.BFLOAT16, WireDtype.FLOAT16})

WIRE_DTYPE_BY_NAME = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
