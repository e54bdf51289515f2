"""Shared fixtures: real Redis under a key prefix of the test's own, cleaned before and after."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import redis
import torch

REDIS_URL = os.environ.get("SPLITFED_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# The per-user model cache the product itself uses (shared/model_store.cache_root: $SPLITFED_CACHE_DIR,
# else ~/.cache/splitfed), read once here, before any test points SPLITFED_CACHE_DIR at a temporary
# directory. Tests that only need a converted real model (not the conversion itself) take it from here,
# so a machine converts each model once, not on every run; test_model_store still converts SmolLM2
# from scratch into a fresh cache.
USER_CACHE = Path(os.environ.get("SPLITFED_CACHE_DIR") or Path.home() / ".cache" / "splitfed").expanduser()


def _wipe(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_prefix():
    """A unique key prefix; every key under it is deleted before and after the test."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"tests need Redis at {REDIS_URL} (set SPLITFED_TEST_REDIS_URL): {exc}")
    prefix = f"splitfed-test-{secrets.token_hex(4)}"
    _wipe(client, prefix)
    yield prefix
    _wipe(client, prefix)
    client.close()


@pytest.fixture
def registry(redis_prefix):
    from shared.state.registry import Registry

    return Registry(REDIS_URL, redis_prefix, "run1")


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: a second thread only adds overhead on a shared box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
