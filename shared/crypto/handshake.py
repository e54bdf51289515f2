"""The per-round handshake between a silo and the trunk service, which gives both one session.

Handshake (one per silo per round: "rekey every round", so a leaked session key exposes one round)
-----------------------------------------------------------------------------------------------
The silo sends a HELLO (bytes, carried by the transport), signed with its Ed25519 identity. Any
trunk worker holding the service key can verify it against the allow-list in Redis and derive the
same session; the silo derives it once it has the trunk's public key, checked against the
fingerprint pinned in its own settings (Redis is a directory, not a trust root). The trunk may
answer with an ACK that proves it derived the same key (key confirmation); the first sealed reply
proves it too.

HELLO, version 1, 196 bytes, little-endian::

    off  len  field
      0    4  magic b"SPFH"
      4    1  version = 1
      5    1  cipher: 1 = AES-256-GCM, 2 = ChaCha20-Poly1305
      6    2  reserved, must be 0
      8   16  run id   (ASCII, NUL-padded; same rules as frame headers)
     24   16  silo id  (ASCII, NUL-padded)
     40    4  round (u32)
     44    8  timestamp (u64, Unix ns; the trunk refuses one more than max_skew_s off)
     52   16  random nonce (HKDF salt: two hellos never give the same key)
     68   32  silo ephemeral X25519 public key (fresh per hello, private half never stored)
    100   32  silo static X25519 public key (must equal the enrolled one)
    132   64  Ed25519 signature over b"splitfed-hello-v1\\0" + bytes 0..131, or, when the silo binds its
              run config (shared/state/run_config.py), over b"splitfed-hello-v1\\0config=" + digest + b"\\0"
              + bytes 0..131: the trunk verifies it over the digest of ITS OWN settings, so a claim
              altered on the way (the HELLO's text) fails here

ACK, version 1, 72 bytes: magic b"SPFA", version 1, cipher, 2 reserved bytes, the trunk's X25519
public key (32), confirm = HMAC-SHA256(k_confirm, b"splitfed-ack-v1" + SHA-256(hello)) (32).

Key schedule (``cryptography`` primitives only)::

    ikm  = X25519(eph_silo, trunk) || X25519(static_silo, trunk)
    info = b"splitfed-v1" + run id (16) + round (u32) + silo static pub + silo eph pub + trunk pub
           + SHA-256(hello)                 # transcript: binds silo id, cipher, timestamp, nonce
    k_s2t | k_t2s | k_confirm = HKDF-SHA256(ikm, salt = hello nonce, info, 96 bytes)

The ephemeral half gives forward secrecy against a later leak of the silo's static keys; the
static half ties the session to the enrolled X25519 key. A leak of the *trunk* key exposes every
session (no trunk ephemeral: any worker must be able to derive a session from the hello alone).

The session itself (sealing and opening frames, the ACK's confirm tag) is shared/crypto/sealing.py's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.crypto.keys import (
    KEY_BYTES,
    KeyStoreError,
    SiloKeys,
    TrunkKeys,
    display_fingerprint,
    fingerprint,
    fingerprints_equal,
)
from shared.wire.ids import ID_FIELD_BYTES
from shared.crypto.sealing import ACK, ACK_MAGIC, ACK_SIZE, CIPHER_NAMES, CIPHERS, HANDSHAKE_VERSION, SealError, Session
from shared.wire.wire import DEFAULT_MAX_TENSOR_BYTES, FrameError, _id_from_wire, _id_to_wire, check_id

HELLO_MAGIC = b"SPFH"
_HELLO_BODY = struct.Struct(f"<4sBBH{ID_FIELD_BYTES}s{ID_FIELD_BYTES}sIQ16s32s32s")
SIG_BYTES = 64
HELLO_SIZE = _HELLO_BODY.size + SIG_BYTES  # 196
_SIG_CONTEXT = b"splitfed-hello-v1\0"
_KDF_INFO = b"splitfed-v1"

LookupFn = Callable[[str], "EnrolledSilo | None"]


class HelloGuard:
    """Per trunk process: each silo's accepted hellos must carry a strictly newer signed timestamp.

    Without it a replayed (validly signed) hello would rebuild a session with an empty replay
    window, and that session's frames could be replayed into it. The order is the silo's own
    signed clock, not the round: a rollback legitimately sends a hello for an EARLIER round (the
    run resumes from its last committed round), and that hello is fresh. A recorded hello is never
    accepted twice, whatever its round. Only verified hellos are recorded, so memory is bounded by
    the number of enrolled silos. (A silo whose clock steps back is refused until it catches up:
    the message says so.)
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, silo_id: str, round_no: int, timestamp_ns: int) -> None:
        with self._lock:
            last = self._last.get(silo_id)
            if last is not None and timestamp_ns <= last:
                raise SealError("stale_hello", f"{silo_id}: hello (round {round_no}) signed at {timestamp_ns} is "
                                f"not newer than the last accepted one ({last}): a replay, or the silo's clock went back")
            self._last[silo_id] = timestamp_ns


@dataclass(frozen=True)
class HelloFields:
    """A hello's fields, parsed and structurally checked but NOT verified (for routing and logs)."""

    cipher: str
    run_id: str
    silo_id: str
    round: int
    timestamp_ns: int
    nonce: bytes
    ephemeral_public: bytes
    static_public: bytes
    signature: bytes
    body: bytes


def _derive(ikm: bytes, nonce: bytes, run_id: str, round_no: int, static_pub: bytes, eph_pub: bytes,
            trunk_pub: bytes, transcript: bytes) -> bytes:
    info = b"".join([_KDF_INFO, _id_to_wire(run_id), struct.pack("<I", round_no), static_pub, eph_pub, trunk_pub,
                     transcript])
    return HKDF(algorithm=hashes.SHA256(), length=96, salt=nonce, info=info).derive(ikm)


def _cipher_name(cipher: str) -> str:
    if cipher not in CIPHERS:
        raise ValueError(f"unknown cipher {cipher!r}; one of {sorted(CIPHERS)}")
    return cipher


class PendingSession:
    """The silo's half of a handshake: holds the ephemeral private key until ``complete``."""

    def __init__(self, silo_keys: SiloKeys, fields: HelloFields, hello: bytes, eph: X25519PrivateKey,
                 sender_slot: int | None, replay_window: int, max_tensor_bytes: int) -> None:
        self._keys, self.fields, self._hello, self._eph = silo_keys, fields, hello, eph
        self._opts = (sender_slot, replay_window, max_tensor_bytes)

    def complete(self, trunk_pub: bytes, pinned_fingerprint: str | None, confirm: bytes | None = None) -> Session:
        """Check the trunk key against the pinned fingerprint, derive the session (once).

        ``confirm``: the ACK's confirm tag, if the transport carried one (``complete_ack`` does that).
        """
        if self._eph is None:
            raise ValueError("this hello was already completed; make a new hello")
        trunk_pub = bytes(trunk_pub)
        if len(trunk_pub) != KEY_BYTES:
            raise SealError("bad_ack", f"trunk public key of {len(trunk_pub)} bytes")
        if not pinned_fingerprint:
            raise SealError("fingerprint_mismatch", "no trunk key fingerprint is pinned in this silo's settings")
        actual = fingerprint(trunk_pub)
        try:
            same = fingerprints_equal(actual, pinned_fingerprint)
        except ValueError as exc:
            raise SealError("fingerprint_mismatch", f"pinned value is not a fingerprint: {exc}") from None
        if not same:
            raise SealError("fingerprint_mismatch",
                            f"trunk service key {display_fingerprint(actual)} is not the pinned "
                            f"{display_fingerprint(pinned_fingerprint)}: refusing to talk to it")
        f = self.fields
        try:
            peer = X25519PublicKey.from_public_bytes(trunk_pub)
            ikm = self._eph.exchange(peer) + self._keys.x25519.exchange(peer)
        except ValueError as exc:
            raise SealError("bad_ack", f"unusable trunk key: {exc}") from None
        transcript = hashlib.sha256(self._hello).digest()
        okm = _derive(ikm, f.nonce, f.run_id, f.round, f.static_public, f.ephemeral_public, trunk_pub, transcript)
        slot, window, mtb = self._opts
        session = Session(side="silo", run_id=f.run_id, silo_id=f.silo_id, round_no=f.round, cipher=f.cipher, okm=okm,
                          transcript=transcript, trunk_public=trunk_pub, silo_identity=self._keys.identity_public,
                          sender_slot=0 if slot is None else slot, replay_window=window, max_tensor_bytes=mtb)
        if confirm is not None and not hmac.compare_digest(bytes(confirm), session.confirm_tag()):
            raise SealError("bad_ack", "the trunk did not derive the same session key")
        self._eph = None  # forward secrecy: the ephemeral private key is gone once used
        return session

    def complete_ack(self, ack: bytes, pinned_fingerprint: str | None) -> Session:
        ack = bytes(ack)
        if len(ack) != ACK_SIZE:
            raise SealError("bad_ack", f"ack of {len(ack)} bytes, expected {ACK_SIZE}")
        magic, version, cipher_id, reserved, trunk_pub, confirm = ACK.unpack(ack)
        if magic != ACK_MAGIC or reserved:
            raise SealError("bad_ack", "not a hello ack")
        if version != HANDSHAKE_VERSION:
            raise SealError("bad_version", f"ack version {version}, speak {HANDSHAKE_VERSION}")
        if CIPHER_NAMES.get(cipher_id) != self.fields.cipher:
            raise SealError("bad_cipher", f"trunk answered cipher {cipher_id}, asked {self.fields.cipher}")
        return self.complete(trunk_pub, pinned_fingerprint, confirm)


def make_hello(silo_keys: SiloKeys, silo_id: str, run_id: str, round_no: int, *, cipher: str = "aes-gcm",
               now_ns: int | None = None, sender_slot: int | None = None, replay_window: int = 64,
               max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES, config_digest: str | None = None
               ) -> tuple[bytes, PendingSession]:
    """Build this round's signed hello. Send the bytes; keep the pending half to ``complete``.

    The silo is the only sender in its direction, so its slot defaults to 0. ``config_digest``
    (the silo's run config digest) is bound into the signature; the trunk must pass its own.
    """
    check_id(silo_id, "silo id")
    check_id(run_id, "run id")
    if not 0 <= round_no <= 0xFFFFFFFF:
        raise ValueError(f"round {round_no} does not fit a u32")
    cipher = _cipher_name(cipher)
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    ts = time.time_ns() if now_ns is None else now_ns
    nonce = secrets.token_bytes(16)
    body = _HELLO_BODY.pack(HELLO_MAGIC, HANDSHAKE_VERSION, CIPHERS[cipher], 0, _id_to_wire(run_id),
                            _id_to_wire(silo_id), round_no, ts, nonce, eph_pub, silo_keys.x25519_public)
    sig = silo_keys.identity.sign(_signed_hello(body, config_digest))
    hello = body + sig
    fields = HelloFields(cipher, run_id, silo_id, round_no, ts, nonce, eph_pub, silo_keys.x25519_public, sig, body)
    return hello, PendingSession(silo_keys, fields, hello, eph, sender_slot, replay_window, max_tensor_bytes)


def _signed_hello(body: bytes, config_digest: str | None) -> bytes:
    """What a hello's signature covers: the body, and the silo's run config digest when it binds one."""
    if config_digest is None:
        return _SIG_CONTEXT + body
    return _SIG_CONTEXT + b"config=" + config_digest.encode("ascii") + b"\0" + body


def peek_hello(hello: bytes | memoryview) -> HelloFields:
    """Parse and structurally validate a hello WITHOUT verifying it (routing, logs). Raises SealError."""
    hello = bytes(hello)
    if len(hello) != HELLO_SIZE:
        raise SealError("bad_hello", f"hello of {len(hello)} bytes, expected {HELLO_SIZE}")
    body, sig = hello[: _HELLO_BODY.size], hello[_HELLO_BODY.size :]
    magic, version, cipher_id, reserved, run_raw, silo_raw, round_no, ts, nonce, eph, static = _HELLO_BODY.unpack(body)
    if magic != HELLO_MAGIC:
        raise SealError("bad_hello", f"magic {magic!r}")
    if version != HANDSHAKE_VERSION:
        raise SealError("bad_version", f"hello version {version}, speak {HANDSHAKE_VERSION}")
    if cipher_id not in CIPHER_NAMES:
        raise SealError("bad_cipher", f"cipher id {cipher_id}")
    if reserved:
        raise SealError("bad_hello", "reserved bytes are not zero")
    try:
        run_id, silo_id = _id_from_wire(run_raw, "run id"), _id_from_wire(silo_raw, "silo id")
    except FrameError as exc:
        raise SealError("bad_hello", exc.detail) from None
    return HelloFields(CIPHER_NAMES[cipher_id], run_id, silo_id, round_no, ts, nonce, eph, static, sig, body)


def accept_hello(hello: bytes | memoryview, trunk_keys: TrunkKeys, lookup_fn: LookupFn, run_id: str, *,
                 allowed_ciphers: Sequence[str] = ("aes-gcm", "chacha20"), expected_round: int | None = None,
                 max_skew_s: float = 300.0, now_ns: int | None = None, guard: HelloGuard | None = None,
                 sender_slot: int | None = None, replay_window: int = 64,
                 max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES, config_digest: str | None = None) -> Session:
    """Trunk side: verify a silo's hello against the allow-list and derive the session.

    ``lookup_fn(silo_id)`` returns the enrollment (``shared.crypto.enrollment.lookup`` bound to a registry).
    ``guard`` (one per process) refuses replayed or older hellos. ``sender_slot``: this process's
    unique slot (``shared.crypto.enrollment.claim_sender_slot``); the default is random. ``config_digest``: the
    digest of the trunk's own run config over the fields the silo claims (None: the silo bound none).
    """
    hello = bytes(hello)
    f = peek_hello(hello)
    if f.run_id != run_id:
        raise SealError("wrong_run", f"hello for run {f.run_id!r}, this is {run_id!r}")
    if f.cipher not in allowed_ciphers:
        raise SealError("bad_cipher", f"{f.silo_id} asks for {f.cipher}; allowed: {', '.join(allowed_ciphers)}")
    try:
        enrolled = lookup_fn(f.silo_id)
    except KeyStoreError as exc:
        raise SealError("unknown_silo", str(exc)) from None
    if enrolled is None:
        raise SealError("unknown_silo", f"{f.silo_id} is not enrolled in run {run_id}")
    if enrolled.revoked:
        raise SealError("revoked", f"{f.silo_id} was revoked")
    try:
        Ed25519PublicKey.from_public_bytes(enrolled.ed25519_public).verify(f.signature,
                                                                           _signed_hello(f.body, config_digest))
    except InvalidSignature:
        raise SealError("bad_hello_signature",
                        f"hello claiming {f.silo_id} is not signed by its enrolled identity") from None
    # From here on the hello is authentic: what remains are policy checks.
    if not hmac.compare_digest(f.static_public, enrolled.x25519_public):
        raise SealError("key_mismatch", f"{f.silo_id}'s x25519 key is not the enrolled one (re-enroll it?)")
    now = time.time_ns() if now_ns is None else now_ns
    if abs(now - f.timestamp_ns) > max_skew_s * 1e9:
        raise SealError("stale_hello", f"{f.silo_id}: hello timestamp {(now - f.timestamp_ns) / 1e9:+.0f} s off")
    if expected_round is not None and f.round != expected_round:
        raise SealError("wrong_round", f"{f.silo_id}: hello for round {f.round}, current round is {expected_round}")
    trunk_pub = trunk_keys.x25519_public
    try:
        ikm = trunk_keys.x25519.exchange(X25519PublicKey.from_public_bytes(f.ephemeral_public)) + \
            trunk_keys.x25519.exchange(X25519PublicKey.from_public_bytes(f.static_public))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise SealError("bad_hello", f"unusable ephemeral key: {exc}") from None
    if guard is not None:
        guard.admit(f.silo_id, f.round, f.timestamp_ns)
    transcript = hashlib.sha256(hello).digest()
    okm = _derive(ikm, f.nonce, f.run_id, f.round, f.static_public, f.ephemeral_public, trunk_pub, transcript)
    return Session(side="trunk", run_id=f.run_id, silo_id=f.silo_id, round_no=f.round, cipher=f.cipher, okm=okm,
                   transcript=transcript, trunk_public=trunk_pub, silo_identity=enrolled.ed25519_public,
                   sender_slot=sender_slot, replay_window=replay_window, max_tensor_bytes=max_tensor_bytes)
