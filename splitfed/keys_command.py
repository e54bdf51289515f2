"""`splitfed keys`: generate key pairs, show fingerprints, enroll / list / revoke silos of a run."""

from __future__ import annotations

import json
from pathlib import Path

import click

from shared.crypto import certificates, enrollment
from shared.crypto import keys as keystore
from shared.runtime.cli_options import build_settings, settings_options
from shared.state.registry import Registry, RegistryError
from shared.runtime.settings import CommonSettings


def _registry(options: dict) -> Registry:
    settings = build_settings(CommonSettings, options)
    registry = Registry(settings.redis_url, settings.key_prefix, settings.run_id)
    try:
        registry.ping()
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    return registry


@click.group("keys")
def keys() -> None:
    """Key material of silos and the trunk service, and the run's allow-list of silos."""


@keys.command("gen")
@click.option("--role", type=click.Choice(["silo", "trunk", "operator"]), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="directory for the key files")
@click.option("--force", is_flag=True, help="overwrite existing keys in --out")
def gen(role: str, out_dir: Path, force: bool) -> None:
    """Generate keys (private files mode 0600, never printed); print the public fingerprint."""
    try:
        if role == "silo":
            k = keystore.generate_silo_keys(out_dir, overwrite=force)
            fp = keystore.fingerprint(k.identity_public)
        elif role == "operator":
            fp = keystore.fingerprint(certificates.operator_public(certificates.generate_operator_key(out_dir, force)))
        else:
            k = keystore.generate_trunk_keys(out_dir, overwrite=force)
            fp = k.fingerprint
    except (keystore.KeyFileError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{role} keys written to {out_dir}")
    click.echo(f"fingerprint: {fp}")
    if role == "trunk":
        click.echo("silos pin it with --trunk-fingerprint (SPLITFED_TRUNK_FINGERPRINT)")
    elif role == "operator":
        click.echo("every role pins it with --operator-fingerprint (SPLITFED_OPERATOR_FINGERPRINT); "
                   f"sign enrollments with: splitfed keys enroll --operator-key {out_dir} ...")
    else:
        click.echo(f"enroll it: splitfed keys enroll --silo-id ID --keys-dir {out_dir}")


@keys.command("fingerprint")
@click.argument("key_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
def show_fingerprint(key_dir: Path) -> None:
    """Print the fingerprint of the public keys in KEY_DIR (trunk: x25519; silo: identity)."""
    try:
        if (key_dir / "ed25519.pub").exists():
            ed, _ = keystore.load_silo_public(key_dir)
            click.echo(keystore.fingerprint(ed))
        else:
            click.echo(keystore.fingerprint(keystore.load_public(key_dir / "x25519.pub")))
    except (keystore.KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@keys.command("enroll")
@click.option("--silo-id", required=True)
@click.option("--keys-dir", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="directory holding the silo's public keys (ed25519.pub, x25519.pub)")
@click.option("--replace", is_flag=True, help="replace different keys, or re-admit a revoked silo")
@click.option("--operator-key", "operator_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="the operator's key directory: sign a certificate for the silo (roles that pin the operator "
                   "take only certified keys)")
@click.option("--valid-days", type=click.IntRange(1, 3650), default=365, show_default=True)
@settings_options(CommonSettings)
def enroll(silo_id: str, keys_dir: Path, replace: bool, operator_dir: Path | None, valid_days: int, **options) -> None:
    """Add a silo's public keys to the run's allow-list in Redis (signed by the operator with --operator-key)."""
    registry = _registry(options)
    try:
        ed, x = keystore.load_silo_public(keys_dir)
        certificate = None
        if operator_dir is not None:
            operator = certificates.load_operator_key(operator_dir)
            epoch = _revocations(registry, operator).epoch
            certificate = certificates.issue(operator, registry.run_id, silo_id, ed, x, epoch, valid_days * 86400)
            enrollment.publish_operator_key(registry, certificates.operator_public(operator))
        entry = enrollment.enroll(registry, silo_id, ed, x, replace=replace, certificate=certificate)
    except (keystore.KeyFileError, keystore.KeyStoreError, certificates.CertificateError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    signed = " (operator-signed certificate)" if certificate is not None else ""
    click.echo(f"enrolled {silo_id} in run {registry.run_id}: {entry.fingerprint}{signed}")


def _revocations(registry: Registry, operator) -> certificates.RevocationList:
    """The run's current revocation list, checked with the operator's own key."""
    check = certificates.CertificateCheck(certificates.operator_public(operator), registry.run_id)
    return check.update_revocations(enrollment.revocations(registry))


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
@settings_options(CommonSettings)
def list_cmd(as_json: bool, **options) -> None:
    """List the run's enrolled (and revoked) silos."""
    entries = enrollment.list_enrolled(_registry(options))
    if as_json:
        click.echo(json.dumps(entries, indent=1))
        return
    if not entries:
        click.echo("no silo is enrolled in this run")
    for e in entries:
        click.echo(f"{e['silo_id']:<16} {e['status']:<9} {e['identity_fingerprint']}")


@keys.command("revoke")
@click.option("--silo-id", required=True)
@click.option("--operator-key", "operator_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="the operator's key directory: add the silo to the signed revocation list, which roles "
                   "that pin the operator check at every handshake")
@settings_options(CommonSettings)
def revoke(silo_id: str, operator_dir: Path | None, **options) -> None:
    """Revoke a silo: its next handshake (at the latest, next round) is refused."""
    registry = _registry(options)
    if not enrollment.revoke(registry, silo_id):
        raise click.ClickException(f"{silo_id} is not enrolled in this run")
    if operator_dir is not None:
        try:
            operator = certificates.load_operator_key(operator_dir)
            epoch, revoked = certificates.revoke_in(_revocations(registry, operator), registry.run_id, silo_id)
            enrollment.store_revocations(registry, certificates.sign_revocations(operator, registry.run_id, epoch, revoked))
        except (keystore.KeyFileError, certificates.CertificateError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"revoked {silo_id} (signed revocation list, epoch {epoch})")
        return
    click.echo(f"revoked {silo_id}")


@keys.command("curve")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--name", required=True, help="certificate name, e.g. broker, trunk0, silo3")
def curve(out_dir: Path, name: str) -> None:
    """Make a CurveZMQ certificate pair: NAME.key (public, goes in the broker's allow-list) and
    NAME.key_secret (mode 0600, stays with the role)."""
    public_file, secret_file = make_curve_certificate(out_dir, name)
    click.echo(f"public certificate {public_file}\nsecret certificate {secret_file} (mode 0600)")


def make_curve_certificate(out_dir: Path, name: str) -> tuple[Path, Path]:
    import os

    import zmq.auth

    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / f"{name}.key_secret").exists():
        raise click.ClickException(f"{out_dir / name}.key_secret exists; refusing to overwrite")
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        public_file, secret_file = zmq.auth.create_certificates(str(out_dir), name)
    finally:
        os.umask(old)
    os.chmod(public_file, 0o644)
    return Path(public_file), Path(secret_file)
