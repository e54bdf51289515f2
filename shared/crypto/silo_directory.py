"""The enrolled silos as a role reads them: with a pinned operator key, only what its certificates vouch for.

Without ``operator_fingerprint`` the directory (Redis) is trusted as it is, as before certificates.
With it, every lookup fetches the operator's public key (checked against the pin once), the
signed revocation list (never older than one seen before) and the silo's certificate, and refuses
an entry its certificate does not vouch for (shared/crypto/certificates.py): the keys handed on are the
ones the operator signed, whoever can write to Redis.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shared.crypto import enrollment
from shared.crypto.certificates import CertificateCheck, CertificateError, pinned_check
from shared.crypto.keys import EnrolledSilo

if TYPE_CHECKING:
    from shared.state.registry import Registry

log = logging.getLogger("directory")


class SiloDirectory:
    def __init__(self, registry: Registry, operator_fingerprint: str | None) -> None:
        self.registry = registry
        self.operator_fingerprint = operator_fingerprint
        self._check: CertificateCheck | None = None

    @property
    def certified(self) -> bool:
        return self.operator_fingerprint is not None

    def lookup(self, silo_id: str) -> EnrolledSilo | None:
        """``silo_id``'s enrollment (None: never enrolled); raises CertificateError when a pinned
        operator's certificate does not vouch for it."""
        entry = enrollment.lookup(self.registry, silo_id)
        if entry is None or not self.certified:
            return entry
        check = self._checker()
        try:
            check.update_revocations(enrollment.revocations(self.registry))
            check.verify(entry.certificate, silo_id, entry.ed25519_public, entry.x25519_public)
        except CertificateError as exc:
            log.warning("refused the directory's entry of %s: %s", silo_id, exc, extra={"reason": exc.reason})
            raise
        return entry

    def _checker(self) -> CertificateCheck:
        if self._check is None:
            self._check = pinned_check(enrollment.operator_public_key(self.registry), self.operator_fingerprint,
                                       self.registry.run_id, "the directory")
        return self._check
