"""Redis ACL users for the server side: one per role, each limited to the run's key prefix and the
commands that role's code sends (shared/state/registry.py, shared/crypto/enrollment.py). Silos have none: they
reach only the broker.

The default user is switched off, so a client without a role's password gets nothing; no role may
run MONITOR (which would show it every other client's commands), CONFIG, KEYS, FLUSH* or any
administrative command. What a role may write among the run's keys is not split further: the
silo keys that matter are operator-signed (shared/crypto/certificates.py), so a role that rewrites them
is refused by every verifier anyway.
"""

from __future__ import annotations

import secrets

ROLES = ("broker", "trunk", "operator")
# redis-py's CLIENT SETINFO at connect is left out on purpose: Redis < 7.2 has no such command (an
# ACL file naming it does not load), and redis-py ignores the refusal of newer servers.
_CONNECT = ("ping",)
_TRANSACTION = ("watch", "unwatch", "multi", "exec", "discard")  # the run config's atomic claim
_ROLE_COMMANDS = {
    "broker": ("get", "set", "del", "exists", "expire", "hget", "hgetall", "hset", "hincrby", "incr", "incrby", "sadd",
               "smembers", *_TRANSACTION),
    "trunk": ("get", "set", "del", "hget", "hgetall", "hset", "hincrby", "incr", "incrby", "sadd", "smembers", *_TRANSACTION),
    # the run's operator: creates runs, enrolls and revokes silos, watches (`splitfed status`), cleans up
    "operator": ("get", "set", "del", "exists", "expire", "ttl", "hget", "hgetall", "hset", "hincrby", "incr",
                 "sadd", "smembers", "srem", "scan", "type", *_TRANSACTION),
}
PLACEHOLDER = "REPLACE-WITH-A-LONG-RANDOM-SECRET"


def user_name(role: str) -> str:
    return f"splitfed-{role}"


def commands_of(role: str) -> tuple[str, ...]:
    return (*_CONNECT, *_ROLE_COMMANDS[role])


def acl_text(key_prefix: str, passwords: dict[str, str]) -> str:
    """An ACL file (`aclfile` in redis.conf) with a user per role and the default user off."""
    if not key_prefix or any(c in key_prefix for c in " *?[]\\"):
        raise ValueError(f"key prefix {key_prefix!r}: no spaces or glob characters")
    lines = ["user default off resetkeys resetchannels -@all"]
    for role in ROLES:
        password = passwords[role]
        if not password or " " in password:
            raise ValueError(f"the {role} password must be non-empty without spaces")
        allowed = " ".join(f"+{c}" for c in commands_of(role))
        lines.append(f"user {user_name(role)} on >{password} resetkeys ~{key_prefix}:* resetchannels -@all {allowed}")
    return "\n".join(lines) + "\n"


def random_passwords() -> dict[str, str]:
    return {role: secrets.token_urlsafe(32) for role in ROLES}


def role_url(role: str, password: str, host: str = "127.0.0.1", port: int = 6379, tls: bool = False) -> str:
    return f"{'rediss' if tls else 'redis'}://{user_name(role)}:{password}@{host}:{port}/0"


def shown_url(url: str) -> str:
    """``url`` fit for a log line: its password, if any, masked."""
    scheme, sep, rest = url.partition("://")
    credentials, at, where = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{where}"
