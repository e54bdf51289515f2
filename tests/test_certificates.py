"""Operator-signed enrollment: whoever can write to Redis cannot get a key past a role that pins the operator.

Each attack edits the real Redis directory the way a silo holding the Redis password could, and
must fail to get in: at the trunk's handshake (accept_hello, as a worker calls it), at the
broker's registration (verify_registration) and at a peer's secure aggregation (the keys it masks with).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from shared.crypto import certificates, enrollment, keys, secure_agg
from shared.crypto.certificates import CertificateError
from shared.crypto.handshake import accept_hello, make_hello
from shared.crypto.registration import sign_registration, verify_registration
from shared.crypto.silo_directory import SiloDirectory

RUN = "run1"


class Operator:
    def __init__(self, tmp_path, name: str = "op") -> None:
        self.dir = tmp_path / name
        self.key = certificates.generate_operator_key(self.dir)
        self.public = certificates.operator_public(self.key)
        self.fingerprint = keys.fingerprint(self.public)

    def enroll(self, registry, silo_id: str, silo: keys.SiloKeys, epoch: int = 0, replace: bool = False,
               **kw) -> bytes:
        cert = certificates.issue(self.key, RUN, silo_id, silo.identity_public, silo.x25519_public, epoch, **kw)
        enrollment.publish_operator_key(registry, self.public)
        enrollment.enroll(registry, silo_id, silo.identity_public, silo.x25519_public, replace=replace, certificate=cert)
        return cert

    def revoke(self, registry, revoked: dict[str, int], epoch: int) -> bytes:
        signed = certificates.sign_revocations(self.key, RUN, epoch, revoked)
        enrollment.store_revocations(registry, signed)
        return signed


@pytest.fixture
def operator(tmp_path):
    return Operator(tmp_path)


@pytest.fixture
def silo():
    return keys.new_silo_keys()


def _hello_reason(registry, operator, silo, silo_id="silo0") -> str | None:
    """None when the trunk accepts silo's hello with keys from the certified directory, else the reason."""
    trunk = keys.new_trunk_keys()
    directory = SiloDirectory(registry, operator.fingerprint)
    hello, _ = make_hello(silo, silo_id, RUN, 0)
    try:
        accept_hello(hello, trunk, directory.lookup, RUN)
    except CertificateError as exc:
        return exc.reason
    return None


def test_a_certified_silo_gets_in_everywhere(registry, operator, silo):
    operator.enroll(registry, "silo0", silo)
    assert _hello_reason(registry, operator, silo) is None
    directory = SiloDirectory(registry, operator.fingerprint)
    assert verify_registration(sign_registration(silo, RUN, "silo0"), RUN, "silo0", directory.lookup, None) > 0
    assert directory.lookup("silo0").x25519_public == silo.x25519_public


def test_a_swapped_public_key_in_the_directory_is_refused(registry, operator, silo):
    operator.enroll(registry, "silo0", silo)
    rogue = keys.new_silo_keys()
    # the attacker puts its own keys in the entry: it could then pass hellos as silo0, and the
    # peers would mask their updates towards the attacker's X25519 key
    registry.redis.hset(registry.key("keys", "silo", "silo0"), mapping={
        "ed25519": rogue.identity_public.hex(), "x25519": rogue.x25519_public.hex()})
    assert _hello_reason(registry, operator, rogue) == "directory_tampered"
    peer = SiloDirectory(registry, operator.fingerprint)
    with pytest.raises(CertificateError, match="directory_tampered"):
        secure_agg.masked_upload([torch.zeros(3)], 1, "silo1", keys.new_silo_keys().x25519,
                                 lambda s: peer.lookup(s).x25519_public, RUN, 0, 0, ["silo0", "silo1"])


def test_an_unsigned_or_wrongly_signed_certificate_is_refused(registry, operator, silo, tmp_path):
    enrollment.publish_operator_key(registry, operator.public)
    enrollment.enroll(registry, "silo0", silo.identity_public, silo.x25519_public)  # no certificate
    assert _hello_reason(registry, operator, silo) == "bad_certificate"
    other = Operator(tmp_path, "other")  # a certificate signed by someone else's operator key
    cert = certificates.issue(other.key, RUN, "silo0", silo.identity_public, silo.x25519_public, 0)
    enrollment.enroll(registry, "silo0", silo.identity_public, silo.x25519_public, certificate=cert)
    assert _hello_reason(registry, operator, silo) == "bad_certificate"
    flipped = bytearray(operator.enroll(registry, "silo0", silo, replace=True))
    flipped[40] ^= 1  # any bit of the signed body
    registry.redis.hset(registry.key("keys", "silo", "silo0"), "certificate", bytes(flipped).hex())
    assert _hello_reason(registry, operator, silo) == "bad_certificate"


def test_a_certificate_of_another_silo_or_run_or_out_of_date_is_refused(registry, operator, silo):
    operator.enroll(registry, "silo0", silo)
    stolen = registry.redis.hget(registry.key("keys", "silo", "silo0"), "certificate")
    enrollment.enroll(registry, "silo1", silo.identity_public, silo.x25519_public)
    registry.redis.hset(registry.key("keys", "silo", "silo1"), "certificate", stolen)
    assert _hello_reason(registry, operator, silo, "silo1") == "bad_certificate"
    operator.enroll(registry, "silo0", silo, replace=True, now=0, validity_s=3600)  # expired in 1970
    assert _hello_reason(registry, operator, silo) == "certificate_expired"


def test_the_directory_cannot_swap_the_operator_key(registry, operator, silo, tmp_path):
    impostor = Operator(tmp_path, "impostor")
    impostor.enroll(registry, "silo0", silo)  # a consistent directory, signed by the wrong operator
    assert _hello_reason(registry, operator, silo) == "bad_operator_key"


def test_a_revoked_silo_is_refused_though_the_directory_still_says_enrolled(registry, operator, silo):
    operator.enroll(registry, "silo0", silo)
    operator.revoke(registry, {"silo0": 1}, epoch=1)
    # the directory's status field says nothing (an attacker would reset it): the signed list decides
    assert enrollment.lookup(registry, "silo0").status == "enrolled"
    assert _hello_reason(registry, operator, silo) == "revoked"
    directory = SiloDirectory(registry, operator.fingerprint)
    with pytest.raises(CertificateError, match="revoked"):
        verify_registration(sign_registration(silo, RUN, "silo0"), RUN, "silo0", directory.lookup, None)


def test_an_old_certificate_replayed_after_revocation_is_refused(registry, operator, silo):
    old_cert = operator.enroll(registry, "silo0", silo)
    operator.revoke(registry, {"silo0": 1}, epoch=1)
    readmitted = keys.new_silo_keys()
    operator.enroll(registry, "silo0", readmitted, epoch=1, replace=True)  # new keys, new certificate
    assert _hello_reason(registry, operator, readmitted) is None
    # the attacker (the old key holder) writes the old keys and certificate back
    registry.redis.hset(registry.key("keys", "silo", "silo0"), mapping={
        "ed25519": silo.identity_public.hex(), "x25519": silo.x25519_public.hex(), "certificate": old_cert.hex()})
    assert _hello_reason(registry, operator, silo) == "revoked"


def test_a_rolled_back_or_dropped_revocation_list_is_refused(registry, operator, silo):
    operator.enroll(registry, "silo0", silo)
    older = operator.revoke(registry, {}, epoch=1)
    directory = SiloDirectory(registry, operator.fingerprint)
    operator.revoke(registry, {"silo0": 2}, epoch=2)
    with pytest.raises(CertificateError, match="revoked"):
        directory.lookup("silo0")
    enrollment.store_revocations(registry, older)  # back to a list from before silo0's revocation
    with pytest.raises(CertificateError, match="bad_revocations"):
        directory.lookup("silo0")
    registry.redis.delete(registry.key("keys", "revocations"))
    with pytest.raises(CertificateError, match="bad_revocations"):
        directory.lookup("silo0")


def test_malformed_certificates_and_lists_are_refused_not_crashed_on(operator):
    check = certificates.CertificateCheck(operator.public, RUN)
    silo = keys.new_silo_keys()
    for raw in (b"", b"\0" * 10, b"\xff" * 300):
        with pytest.raises(CertificateError, match="bad_certificate"):
            check.verify(raw, "silo0", silo.identity_public, silo.x25519_public)
        with pytest.raises(CertificateError, match="bad_revocations"):
            check.update_revocations(raw)
    huge = bytearray(certificates.sign_revocations(operator.key, RUN, 1, {}))
    huge[32:36] = (10**9).to_bytes(4, "little")  # a count that would make us read a gigabyte
    with pytest.raises(CertificateError, match="bad_revocations"):
        check.update_revocations(bytes(huge))


def test_the_keys_cli_signs_enrollments_and_revocations(registry, redis_prefix, tmp_path):
    from splitfed.cli import main
    from tests.conftest import REDIS_URL

    common = ["--redis-url", REDIS_URL, "--key-prefix", redis_prefix, "--run-id", "run1"]
    runner = CliRunner()
    out = runner.invoke(main, ["keys", "gen", "--role", "operator", "--out", str(tmp_path / "op")])
    assert out.exit_code == 0, out.output
    fingerprint = out.output.split("fingerprint: ")[1].split()[0]
    assert runner.invoke(main, ["keys", "gen", "--role", "silo", "--out", str(tmp_path / "s0")]).exit_code == 0
    out = runner.invoke(main, ["keys", "enroll", "--silo-id", "silo0", "--keys-dir", str(tmp_path / "s0"),
                               "--operator-key", str(tmp_path / "op"), *common])
    assert out.exit_code == 0 and "operator-signed" in out.output, out.output
    directory = SiloDirectory(registry, fingerprint)
    silo = keys.load_silo_keys(tmp_path / "s0")
    assert directory.lookup("silo0").ed25519_public == silo.identity_public
    out = runner.invoke(main, ["keys", "revoke", "--silo-id", "silo0", "--operator-key", str(tmp_path / "op"), *common])
    assert out.exit_code == 0 and "epoch 1" in out.output, out.output
    with pytest.raises(CertificateError, match="revoked"):
        directory.lookup("silo0")
