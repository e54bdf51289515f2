"""Signed registration: only the holder of an enrolled silo's identity key may register as it.

Without it, any peer that reaches the broker could send READY as "silo0" first and squat the id
(the fuzz test found exactly that). The silo's READY carries a token signed with its Ed25519
identity; the broker verifies it against the run's allow-list in Redis (public keys only: the
broker still holds no secret). Tokens must be strictly newer per silo, so a captured READY cannot
be replayed from another connection.

Token, version 1, 120 bytes, little-endian::

    off len field
      0   4 magic b"SPFR"
      4   1 version = 1
      5   3 reserved, zero
      8  16 run id (NUL-padded)
     24  16 silo id (NUL-padded)
     40   8 timestamp (u64, Unix ns; at most max_skew_s off the broker's clock)
     48   8 random nonce
     56  64 Ed25519 signature over b"splitfed-ready-v1\\0" + bytes 0..55
"""

from __future__ import annotations

import secrets
import struct
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.crypto.keys import EnrolledSilo, SiloKeys
from shared.wire.ids import ID_FIELD_BYTES
from shared.wire.wire import FrameError, _id_from_wire, _id_to_wire

_BODY = struct.Struct(f"<4sB3x{ID_FIELD_BYTES}s{ID_FIELD_BYTES}sQ8s")
_CONTEXT = b"splitfed-ready-v1\0"
MAGIC = b"SPFR"
TOKEN_SIZE = _BODY.size + 64


class RegistrationError(FrameError):
    pass


def sign_registration(keys: SiloKeys, run_id: str, silo_id: str, now_ns: int | None = None) -> bytes:
    ts = time.time_ns() if now_ns is None else now_ns
    body = _BODY.pack(MAGIC, 1, _id_to_wire(run_id), _id_to_wire(silo_id), ts, secrets.token_bytes(8))
    return body + keys.identity.sign(_CONTEXT + body)


def verify_registration(token: bytes, run_id: str, silo_id: str, lookup_fn: Callable[[str], EnrolledSilo | None],
                        last_ts: int | None, max_skew_s: float = 300.0, now_ns: int | None = None) -> int:
    """Return the token's timestamp if it proves ``silo_id``'s identity; raise RegistrationError."""
    if len(token) != TOKEN_SIZE:
        raise RegistrationError("bad_registration", f"token of {len(token)} bytes, expected {TOKEN_SIZE}")
    body, sig = token[: _BODY.size], token[_BODY.size :]
    magic, version, run_raw, silo_raw, ts, _nonce = _BODY.unpack(body)
    if magic != MAGIC or version != 1:
        raise RegistrationError("bad_registration", "not a registration token")
    if _id_from_wire(run_raw, "run id") != run_id or _id_from_wire(silo_raw, "silo id") != silo_id:
        raise RegistrationError("bad_registration", "token names another run or silo")
    enrolled = lookup_fn(silo_id)
    if enrolled is None:
        raise RegistrationError("unknown_silo", f"{silo_id} is not enrolled in run {run_id}")
    if enrolled.revoked:
        raise RegistrationError("revoked", f"{silo_id} was revoked")
    try:
        Ed25519PublicKey.from_public_bytes(enrolled.ed25519_public).verify(sig, _CONTEXT + body)
    except InvalidSignature:
        raise RegistrationError("bad_registration", f"READY for {silo_id} is not signed by its enrolled identity") from None
    now = time.time_ns() if now_ns is None else now_ns
    if abs(now - ts) > max_skew_s * 1e9:
        raise RegistrationError("bad_registration", f"token timestamp {(now - ts) / 1e9:+.0f} s off")
    if last_ts is not None and ts <= last_ts:
        raise RegistrationError("replay", f"{silo_id}: registration token is not newer than the last accepted")
    return ts
