"""`splitfed redis-acl`: Redis ACL users for the run's server side, and each role's Redis URL."""

from __future__ import annotations

from pathlib import Path

import click

from shared.state import redis_acl
from shared.state.atomic_files import write_bytes_atomic


@click.command("redis-acl")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="directory for users.acl and one <role>.redis.env per role (all mode 0600)")
@click.option("--key-prefix", default="splitfed", show_default=True, help="the runs' Redis key prefix")
@click.option("--host", default="127.0.0.1", show_default=True, help="the Redis host, as the roles reach it")
@click.option("--port", default=6379, show_default=True, type=click.IntRange(1, 65535))
@click.option("--tls", is_flag=True, help="rediss:// URLs (Redis with tls-port)")
@click.option("--tls-ca", type=click.Path(path_type=Path, dir_okay=False),
              help="with --tls: the CA file the roles verify Redis's certificate with (a private CA)")
def redis_acl_command(out_dir: Path, key_prefix: str, host: str, port: int, tls: bool, tls_ca: Path | None) -> None:
    """Write an ACL file with one user per server role (broker, trunk, operator), each limited to the
    key prefix and the commands it needs, random passwords, and each role's SPLITFED_REDIS_URL.
    Silos get none: they reach only the broker. Nothing secret is printed."""
    passwords = redis_acl.random_passwords()
    try:
        text = redis_acl.acl_text(key_prefix, passwords)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / "users.acl", text.encode(), mode=0o600)
    for role in redis_acl.ROLES:
        url = redis_acl.role_url(role, passwords[role], host, port, tls)
        if tls and tls_ca is not None:
            url += f"?ssl_ca_certs={tls_ca}"
        write_bytes_atomic(out_dir / f"{role}.redis.env", f"SPLITFED_REDIS_URL={url}\n".encode(), mode=0o600)
    click.echo(f"wrote {out_dir / 'users.acl'} (Redis: `aclfile {out_dir / 'users.acl'}`, then restart) and "
               f"{', '.join(f'{r}.redis.env' for r in redis_acl.ROLES)} (each role's EnvironmentFile)")
