"""The run's key directory in Redis: enrolled silos (the allow-list), the trunk key, nonce slots.

In Redis (a *directory*, not a trust root: silos pin the trunk fingerprint from their own config)::

    {prefix}:run:{run_id}:keys:silo:{silo_id}   hash  ed25519, x25519 (hex), status, enrolled_at, revoked_at,
                                                      certificate (hex, operator-signed; shared/crypto/certificates.py)
    {prefix}:run:{run_id}:keys:operator         hash  ed25519 (hex): the operator's public key (pinned by fingerprint)
    {prefix}:run:{run_id}:keys:revocations      str   the operator-signed revocation list (hex)
    {prefix}:run:{run_id}:keys:silos            set   enrolled silo ids (listing without SCAN)
    {prefix}:run:{run_id}:keys:trunk            hash  x25519 (hex), fingerprint, published_at
    {prefix}:run:{run_id}:keys:trunk_slots      int   INCR counter handing each trunk worker process
                                                      a unique nonce slot (see shared.crypto.sealing)

Revocation marks the entry (status=revoked) instead of deleting it, so a revoked silo is refused
with the reason "revoked" rather than "unknown_silo", and the audit trail stays.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from shared.crypto.keys import KEY_BYTES, MAX_SLOTS, EnrolledSilo, KeyStoreError, fingerprint
from shared.wire.wire import check_id

if TYPE_CHECKING:  # registry imports redis; this module stays importable without touching it
    from shared.state.registry import Registry


def _silo_key(registry: Registry, silo_id: str) -> str:
    return registry.key("keys", "silo", silo_id)


def enroll(registry: Registry, silo_id: str, ed25519_pub: bytes, x25519_pub: bytes,
           replace: bool = False, certificate: bytes | None = None) -> EnrolledSilo:
    """Add a silo's public keys to the run's allow-list.

    Enrolling the same keys again is a no-op. Different keys for an enrolled silo, or re-admitting a
    revoked one, needs ``replace=True``: both are deliberate operator decisions.
    """
    check_id(silo_id, "silo id")
    for raw, cls, what in ((ed25519_pub, Ed25519PublicKey, "ed25519"), (x25519_pub, X25519PublicKey, "x25519")):
        try:
            cls.from_public_bytes(bytes(raw))
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(f"invalid {what} public key for {silo_id}: {exc}") from None
    current = lookup(registry, silo_id)
    if current is not None and not replace:
        if current.revoked:
            raise KeyStoreError(f"silo {silo_id} was revoked; re-admitting it needs replace=True")
        if (current.ed25519_public, current.x25519_public) != (bytes(ed25519_pub), bytes(x25519_pub)):
            raise KeyStoreError(f"silo {silo_id} is enrolled with other keys; replacing them needs replace=True")
        if certificate is None or certificate == current.certificate:
            return current
    entry = EnrolledSilo(silo_id, bytes(ed25519_pub), bytes(x25519_pub), "enrolled", round(time.time(), 3),
                         certificate=certificate)
    fields = {"ed25519": entry.ed25519_public.hex(), "x25519": entry.x25519_public.hex(),
              "status": entry.status, "enrolled_at": f"{entry.enrolled_at:.3f}"}
    if certificate is not None:
        fields["certificate"] = bytes(certificate).hex()
    pipe = registry.redis.pipeline()
    pipe.delete(_silo_key(registry, silo_id))  # drop a stale revoked_at
    pipe.hset(_silo_key(registry, silo_id), mapping=fields)
    pipe.sadd(registry.key("keys", "silos"), silo_id)
    pipe.execute()
    return entry


def revoke(registry: Registry, silo_id: str) -> bool:
    """Mark a silo revoked (its next hello is refused). False if it was never enrolled."""
    check_id(silo_id, "silo id")
    key = _silo_key(registry, silo_id)
    if not registry.redis.exists(key):
        return False
    registry.redis.hset(key, mapping={"status": "revoked", "revoked_at": f"{time.time():.3f}"})
    return True


def lookup(registry: Registry, silo_id: str) -> EnrolledSilo | None:
    """The enrollment of ``silo_id`` (revoked ones included, marked), or None if never enrolled."""
    check_id(silo_id, "silo id")
    fields = registry.redis.hgetall(_silo_key(registry, silo_id))
    if not fields:
        return None
    try:
        ed, x = bytes.fromhex(fields["ed25519"]), bytes.fromhex(fields["x25519"])
        if len(ed) != KEY_BYTES or len(x) != KEY_BYTES:
            raise ValueError("key length")
        revoked_at, certificate = fields.get("revoked_at"), fields.get("certificate")
        return EnrolledSilo(silo_id, ed, x, fields["status"], float(fields["enrolled_at"]),
                            float(revoked_at) if revoked_at else None,
                            bytes.fromhex(certificate) if certificate else None)
    except (KeyError, ValueError) as exc:
        raise KeyStoreError(f"malformed enrollment entry for {silo_id} in Redis ({exc})") from None


def publish_operator_key(registry: Registry, ed25519_pub: bytes) -> None:
    """Advertise the operator's public key (every role checks it against its pinned fingerprint)."""
    Ed25519PublicKey.from_public_bytes(bytes(ed25519_pub))
    registry.redis.hset(registry.key("keys", "operator"), mapping={"ed25519": bytes(ed25519_pub).hex()})


def operator_public_key(registry: Registry) -> bytes | None:
    raw = registry.redis.hget(registry.key("keys", "operator"), "ed25519")
    try:
        return bytes.fromhex(raw) if raw is not None else None
    except ValueError:
        raise KeyStoreError("malformed operator key entry in Redis") from None


def store_revocations(registry: Registry, signed_list: bytes) -> None:
    registry.redis.set(registry.key("keys", "revocations"), bytes(signed_list).hex())


def revocations(registry: Registry) -> bytes | None:
    raw = registry.redis.get(registry.key("keys", "revocations"))
    try:
        return bytes.fromhex(raw) if raw is not None else None
    except ValueError:
        return b""  # malformed: the verifier refuses it (a list of the wrong size)


def list_enrolled(registry: Registry) -> list[dict]:
    out = []
    for silo_id in sorted(registry.redis.smembers(registry.key("keys", "silos"))):
        entry = lookup(registry, silo_id)
        if entry is not None:
            out.append(entry.as_dict())
    return out


def publish_trunk_key(registry: Registry, x25519_pub: bytes) -> str:
    """Advertise the trunk service's public key (silos still check it against their pinned fingerprint)."""
    try:
        X25519PublicKey.from_public_bytes(bytes(x25519_pub))
    except ValueError as exc:
        raise KeyStoreError(f"invalid trunk x25519 public key: {exc}") from None
    fp = fingerprint(bytes(x25519_pub))
    registry.redis.hset(registry.key("keys", "trunk"), mapping={
        "x25519": bytes(x25519_pub).hex(), "fingerprint": fp, "published_at": f"{time.time():.3f}",
    })
    return fp


def trunk_public_key(registry: Registry) -> bytes | None:
    raw = registry.redis.hget(registry.key("keys", "trunk"), "x25519")
    if raw is None:
        return None
    try:
        pub = bytes.fromhex(raw)
    except ValueError:
        pub = b""
    if len(pub) != KEY_BYTES:
        raise KeyStoreError("malformed trunk key entry in Redis")
    return pub


def claim_sender_slot(registry: Registry) -> int:
    """A nonce slot no other process of this run has had (INCR is atomic). Call once per process start.

    Every trunk worker seals trunk->silo frames under the same session key; distinct slots keep
    their nonces disjoint (see shared.crypto.sealing).
    """
    slot = int(registry.redis.incr(registry.key("keys", "trunk_slots")))
    if not 0 < slot <= MAX_SLOTS:
        raise KeyStoreError(f"nonce slots of this run are exhausted ({slot})")
    return slot
