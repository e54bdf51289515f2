"""Operator-signed silo certificates and revocation lists: Redis is a directory, not a trust root.

The run's operator holds an Ed25519 key (``splitfed keys gen --role operator``). Enrolling a silo
signs a certificate binding the run id, the silo id, its Ed25519 identity and X25519 keys, a
validity window and the revocation epoch it was issued at. Every role that takes a silo's keys
from the directory (the broker for registration, the trunk for hellos, peer silos for secure
aggregation) pins the operator's key fingerprint and verifies the certificate, whatever the
directory hands it: a swapped key, an unsigned or wrongly signed certificate is refused.

Revocation is an operator-signed list: its epoch grows by one with each revocation, and it names
each revoked silo with the epoch of its revocation. A certificate is valid only when it was issued
at or after its silo's revocation epoch, so a silo re-admitted with new keys gets a new certificate
and its old one, replayed, stays refused. A verifier remembers the highest list epoch it has seen:
an older list handed back by the directory (to un-revoke someone) is refused.

Layouts (little-endian; ids are the wire's fixed 16-byte fields)::

    certificate  "SFC1" u8 version, 3 pad, run id, silo id, ed25519 (32), x25519 (32),
                 not_before u64, not_after u64 (unix seconds), epoch u64;  then the signature (64)
    revocations  "SFR1" u8 version, 3 pad, run id, epoch u64, count u32, count x (silo id, epoch u64);
                 then the signature (64)

Each signature covers a domain string and the body, so neither can pass for the other.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.crypto import keys as keystore
from shared.wire.ids import ID_FIELD_BYTES, check_id
from shared.wire.wire import FrameError, _id_from_wire, _id_to_wire

OPERATOR_KEY, OPERATOR_PUB = "operator.key", "operator.pub"
VERSION = 1
SIGNATURE_BYTES = 64
DEFAULT_VALIDITY_S = 365 * 24 * 3600
MAX_REVOKED = 100_000

_CERT = struct.Struct(f"<4sB3x{ID_FIELD_BYTES}s{ID_FIELD_BYTES}s32s32sQQQ")
_CERT_DOMAIN = b"splitfed silo certificate v1\0"
_LIST_HEAD = struct.Struct(f"<4sB3x{ID_FIELD_BYTES}sQI")
_LIST_ENTRY = struct.Struct(f"<{ID_FIELD_BYTES}sQ")
_LIST_DOMAIN = b"splitfed revocation list v1\0"


class CertificateError(FrameError):
    """A silo's directory entry that its certificate does not vouch for (counted under ``reason``)."""


@dataclasses.dataclass(frozen=True)
class SiloCertificate:
    run_id: str
    silo_id: str
    ed25519_public: bytes
    x25519_public: bytes
    not_before: int
    not_after: int
    epoch: int


@dataclasses.dataclass(frozen=True)
class RevocationList:
    run_id: str
    epoch: int
    revoked: dict[str, int]  # silo -> the list epoch that revoked it


# ---------------------------------------------------------------- the operator's key


def generate_operator_key(out_dir: str | os.PathLike, overwrite: bool = False) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    out = keystore.prepare_key_dir(Path(out_dir), [OPERATOR_KEY, OPERATOR_PUB], overwrite)
    keystore.write_private_key(out / OPERATOR_KEY, key)
    keystore.write_public_key(out / OPERATOR_PUB, operator_public(key))
    return key


def load_operator_key(key_dir: str | os.PathLike) -> Ed25519PrivateKey:
    return keystore.read_private_key(Path(key_dir) / OPERATOR_KEY, Ed25519PrivateKey, allow_insecure=False)


def operator_public(key: Ed25519PrivateKey) -> bytes:
    return keystore.raw_public(key.public_key())


# ---------------------------------------------------------------- issuing (the operator)


def issue(operator: Ed25519PrivateKey, run_id: str, silo_id: str, ed25519_pub: bytes, x25519_pub: bytes,
          epoch: int, validity_s: int = DEFAULT_VALIDITY_S, now: float | None = None) -> bytes:
    check_id(run_id, "run id")
    check_id(silo_id, "silo id")
    start = int(time.time() if now is None else now)
    body = _CERT.pack(b"SFC1", VERSION, _id_to_wire(run_id), _id_to_wire(silo_id), bytes(ed25519_pub),
                      bytes(x25519_pub), start, start + int(validity_s), epoch)
    return body + operator.sign(_CERT_DOMAIN + body)


def sign_revocations(operator: Ed25519PrivateKey, run_id: str, epoch: int, revoked: dict[str, int]) -> bytes:
    body = _LIST_HEAD.pack(b"SFR1", VERSION, _id_to_wire(run_id), epoch, len(revoked))
    body += b"".join(_LIST_ENTRY.pack(_id_to_wire(s), e) for s, e in sorted(revoked.items()))
    return body + operator.sign(_LIST_DOMAIN + body)


def revoke_in(current: RevocationList | None, run_id: str, silo_id: str) -> tuple[int, dict[str, int]]:
    """(epoch, revoked) of the list that adds ``silo_id`` to ``current``: one epoch later."""
    epoch = (current.epoch if current is not None else 0) + 1
    revoked = dict(current.revoked) if current is not None else {}
    revoked[silo_id] = epoch
    return epoch, revoked


# ---------------------------------------------------------------- verifying (everyone else)


def _verified_body(raw: bytes, size: int, domain: bytes, operator_pub: bytes, what: str) -> bytes:
    if len(raw) != size + SIGNATURE_BYTES:
        raise CertificateError("bad_certificate", f"{what}: {len(raw)} bytes, expected {size + SIGNATURE_BYTES}")
    body, signature = raw[:size], raw[size:]
    try:
        Ed25519PublicKey.from_public_bytes(operator_pub).verify(signature, domain + body)
    except InvalidSignature:
        raise CertificateError("bad_certificate", f"{what} is not signed by the pinned operator key") from None
    return body


def open_certificate(raw: bytes, operator_pub: bytes) -> SiloCertificate:
    body = _verified_body(bytes(raw), _CERT.size, _CERT_DOMAIN, operator_pub, "certificate")
    magic, version, run, silo, ed, x, not_before, not_after, epoch = _CERT.unpack(body)
    if magic != b"SFC1" or version != VERSION:
        raise CertificateError("bad_certificate", f"certificate magic {magic!r} version {version}")
    return SiloCertificate(_id_from_wire(run, "run id"), _id_from_wire(silo, "silo id"), ed, x, not_before,
                           not_after, epoch)


def open_revocations(raw: bytes, operator_pub: bytes) -> RevocationList:
    raw = bytes(raw)
    if len(raw) < _LIST_HEAD.size:
        raise CertificateError("bad_revocations", f"revocation list of {len(raw)} bytes")
    count = _LIST_HEAD.unpack_from(raw)[4]
    if count > MAX_REVOKED:
        raise CertificateError("bad_revocations", f"revocation list claims {count} entries")
    body = _verified_body(raw, _LIST_HEAD.size + count * _LIST_ENTRY.size, _LIST_DOMAIN, operator_pub,
                          "revocation list")
    magic, version, run, epoch, _ = _LIST_HEAD.unpack_from(body)
    if magic != b"SFR1" or version != VERSION:
        raise CertificateError("bad_revocations", f"revocation list magic {magic!r} version {version}")
    revoked = {}
    for i in range(count):
        silo, at = _LIST_ENTRY.unpack_from(body, _LIST_HEAD.size + i * _LIST_ENTRY.size)
        revoked[_id_from_wire(silo, "silo id")] = at
    return RevocationList(_id_from_wire(run, "run id"), epoch, revoked)


def pinned_check(operator_public: bytes | None, pinned_fingerprint: str, run_id: str, source: str) -> CertificateCheck:
    """A verifier for ``operator_public`` as ``source`` (the directory, the broker) hands it over,
    once it is the key this role pins; CertificateError("bad_operator_key") otherwise."""
    if operator_public is None:
        raise CertificateError("bad_operator_key", f"{source} holds no operator key "
                                                   "(enroll silos with `splitfed keys enroll --operator-key`)")
    if not keystore.fingerprints_equal(keystore.fingerprint(operator_public), pinned_fingerprint):
        shown = keystore.display_fingerprint(keystore.fingerprint(operator_public))
        raise CertificateError("bad_operator_key", f"{source}'s operator key {shown} is not the pinned one")
    return CertificateCheck(operator_public, run_id)


class CertificateCheck:
    """One role's verifier: the pinned operator key, and the newest revocation list it has seen."""

    def __init__(self, operator_pub: bytes, run_id: str) -> None:
        self.operator_pub = bytes(operator_pub)
        self.run_id = run_id
        self.revocations = RevocationList(run_id, 0, {})

    def update_revocations(self, raw: bytes | None) -> RevocationList:
        """Take the directory's revocation list; one older than a list already seen is refused."""
        if raw is None:
            if self.revocations.epoch > 0:
                raise CertificateError("bad_revocations", f"the directory dropped the revocation list "
                                                          f"(epoch {self.revocations.epoch} seen)")
            return self.revocations
        listed = open_revocations(raw, self.operator_pub)
        if listed.run_id != self.run_id:
            raise CertificateError("bad_revocations", f"revocation list of run {listed.run_id!r}")
        if listed.epoch < self.revocations.epoch:
            raise CertificateError("bad_revocations", f"revocation list epoch {listed.epoch} is older than "
                                                      f"{self.revocations.epoch}, seen before (a rolled-back directory)")
        self.revocations = listed
        return listed

    def verify(self, raw: bytes | None, silo_id: str, ed25519_pub: bytes, x25519_pub: bytes,
               now: float | None = None) -> SiloCertificate:
        """The certificate of a directory entry, checked against the entry's keys."""
        if raw is None:
            raise CertificateError("bad_certificate", f"{silo_id} has no operator-signed certificate")
        cert = open_certificate(raw, self.operator_pub)
        if (cert.run_id, cert.silo_id) != (self.run_id, silo_id):
            raise CertificateError("bad_certificate", f"certificate of {cert.silo_id} in run {cert.run_id}, "
                                                      f"not of {silo_id} in {self.run_id}")
        if (cert.ed25519_public, cert.x25519_public) != (bytes(ed25519_pub), bytes(x25519_pub)):
            raise CertificateError("directory_tampered", f"the directory's keys of {silo_id} are not the "
                                                         "ones its certificate binds")
        now = time.time() if now is None else now
        if not cert.not_before <= now <= cert.not_after:
            raise CertificateError("certificate_expired", f"{silo_id}'s certificate is valid "
                                                          f"{cert.not_before}..{cert.not_after}, now is {int(now)}")
        revoked_at = self.revocations.revoked.get(silo_id)
        if revoked_at is not None and cert.epoch < revoked_at:
            raise CertificateError("revoked", f"{silo_id} was revoked at epoch {revoked_at}; its certificate "
                                              f"is of epoch {cert.epoch}")
        return cert
