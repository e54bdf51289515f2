"""Generate click options from a settings class, so the CLI and the environment are one setting.

An option left out on the command line is not passed to the settings class at all, so pydantic
falls back to the ``SPLITFED_*`` environment variable and then to the field default.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click
from pydantic import ValidationError
from pydantic_settings import BaseSettings


def _click_type(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin is Literal:
        return click.Choice([str(a) for a in get_args(annotation)])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _click_type(inner[0])
    if annotation is bool:
        return click.BOOL
    if annotation in (int, float, str):
        return annotation
    if annotation is Path:
        return click.Path(path_type=Path)
    return str


def settings_options(settings_cls: type[BaseSettings]):
    """Decorator adding ``--field-name`` for every field of ``settings_cls``."""
    prefix = settings_cls.model_config.get("env_prefix", "")

    def decorate(fn):
        for name, field in reversed(list(settings_cls.model_fields.items())):
            env = f"{prefix}{name.upper()}"
            help_text = f"{field.description or ''} [env {env}; default {field.default!r}]"
            fn = click.option(
                f"--{name.replace('_', '-')}", name, type=_click_type(field.annotation), default=None, help=help_text
            )(fn)
        return fn

    return decorate


def build_settings(settings_cls: type[BaseSettings], options: dict[str, Any]) -> Any:
    """Instantiate settings from the options given; a validation error becomes a clean CLI error."""
    given = {k: v for k, v in options.items() if v is not None and k in settings_cls.model_fields}
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise click.UsageError("invalid settings:\n" + "\n".join(lines)) from None


def open_registry(settings: Any, log: logging.Logger):
    """The run's Redis registry, or exit with REDIS_UNAVAILABLE and a clear message."""
    from shared.runtime import exit_codes
    from shared.state.registry import Registry, RegistryError

    registry = Registry(settings.redis_url, settings.key_prefix, settings.run_id)
    try:
        registry.ping()
    except RegistryError as exc:
        log.error("%s", exc)
        sys.exit(exit_codes.REDIS_UNAVAILABLE)
    return registry


@contextlib.contextmanager
def redis_permissions(role: str, log: logging.Logger):
    """Exit with REDIS_UNAVAILABLE and say which permission is missing, instead of a traceback,
    when this role's Redis ACL user may not run a command the role needs (ops/redis/users.acl)."""
    from redis.exceptions import NoPermissionError

    from shared.runtime import exit_codes

    try:
        yield
    except NoPermissionError as exc:
        log.error("the Redis user of this %s lacks a permission it needs: %s (`splitfed redis-acl` writes "
                  "the users each role needs)", role, exc)
        sys.exit(exit_codes.REDIS_UNAVAILABLE)
