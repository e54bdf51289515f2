"""The participants' keys a silo masks its FedAvg update with, as the broker hands them over.

Silos reach no Redis: for each aggregation attempt the broker reads the participants' enrollments
(and the operator key and signed revocation list) from the directory and sends them with AGG_START.
A silo that pins the operator verifies every entry's certificate exactly as a server role does
(shared/crypto/certificates.py), so neither the broker nor anyone with Redis access can swap a peer's key
and unmask that peer's update; without the pin it takes the broker's word.

Layout (little-endian)::

    "SFPK" u8 version, u8 flags (1: operator key, 2: revocation list), u16 count, u32 list length,
    [operator ed25519 (32)], [revocation list], count x (silo id (16), ed25519 (32), x25519 (32),
    u16 certificate length, certificate)
"""

from __future__ import annotations

import dataclasses
import struct

from shared.crypto.certificates import CertificateCheck, pinned_check
from shared.wire.ids import ID_FIELD_BYTES
from shared.wire.protocol import MAX_BUNDLE
from shared.wire.wire import FrameError, _id_from_wire, _id_to_wire

VERSION = 1
_HEAD = struct.Struct("<4sBBHI")
_ENTRY = struct.Struct(f"<{ID_FIELD_BYTES}s32s32sH")
MAX_LIST_BYTES = 4 * 1024 * 1024
MAX_CERT_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class PeerEntry:
    silo_id: str
    ed25519_public: bytes
    x25519_public: bytes
    certificate: bytes | None = None


@dataclasses.dataclass(frozen=True)
class PeerKeys:
    entries: tuple[PeerEntry, ...]
    operator_public: bytes | None = None
    revocations: bytes | None = None

    def to_wire(self) -> bytes:
        flags = (1 if self.operator_public is not None else 0) | (2 if self.revocations is not None else 0)
        out = [_HEAD.pack(b"SFPK", VERSION, flags, len(self.entries), len(self.revocations or b""))]
        out += [self.operator_public or b"", self.revocations or b""]
        for e in self.entries:
            cert = e.certificate or b""
            out.append(_ENTRY.pack(_id_to_wire(e.silo_id), e.ed25519_public, e.x25519_public, len(cert)) + cert)
        return b"".join(out)

    @classmethod
    def from_wire(cls, raw: bytes) -> PeerKeys:
        """FrameError("bad_peer_keys") for anything but exactly one well-formed, bounded payload."""
        raw = bytes(raw)
        try:
            magic, version, flags, count, list_len = _HEAD.unpack_from(raw)
            if magic != b"SFPK" or version != VERSION or flags > 3 or count > MAX_BUNDLE or list_len > MAX_LIST_BYTES:
                raise ValueError(f"header {magic!r} v{version} flags {flags} count {count} list {list_len}")
            at = _HEAD.size
            operator = None
            if flags & 1:
                operator, at = raw[at:at + 32], at + 32
            revocations = None
            if flags & 2:
                revocations, at = raw[at:at + list_len], at + list_len
            entries = []
            for _ in range(count):
                silo, ed, x, cert_len = _ENTRY.unpack_from(raw, at)
                at += _ENTRY.size
                if cert_len > MAX_CERT_BYTES:
                    raise ValueError(f"certificate of {cert_len} bytes")
                cert, at = raw[at:at + cert_len], at + cert_len
                entries.append(PeerEntry(_id_from_wire(silo, "silo id"), ed, x, cert or None))
            if at != len(raw) or (operator is not None and len(operator) != 32):
                raise ValueError(f"{len(raw)} bytes, the fields take {at}")
        except (struct.error, ValueError, FrameError) as exc:
            raise FrameError("bad_peer_keys", str(exc)) from None
        return cls(tuple(entries), operator, revocations)


class HandedKeys:
    """The peers' X25519 keys of the current aggregation attempt, verified when the operator is pinned."""

    def __init__(self, run_id: str, operator_fingerprint: str | None) -> None:
        self.run_id = run_id
        self.operator_fingerprint = operator_fingerprint
        self._check: CertificateCheck | None = None  # kept across rounds: revocation epochs only grow
        self.keys: dict[str, bytes] = {}

    def take(self, raw: bytes) -> None:
        handed = PeerKeys.from_wire(raw)
        if self.operator_fingerprint is not None:
            check = self._checker(handed.operator_public)
            check.update_revocations(handed.revocations)
            for e in handed.entries:
                check.verify(e.certificate, e.silo_id, e.ed25519_public, e.x25519_public)
        self.keys = {e.silo_id: e.x25519_public for e in handed.entries}

    def _checker(self, operator_public: bytes | None) -> CertificateCheck:
        check = pinned_check(operator_public, self.operator_fingerprint, self.run_id, "the broker")  # each time
        if self._check is None:  # the first one is kept: it remembers the newest revocation epoch seen
            self._check = check
        return self._check
