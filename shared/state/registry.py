"""Redis registry: run metadata, round state, membership, liveness and rejection counters.

Every key of a run lives under ``{prefix}:run:{run_id}:`` (schema in the README, section
"Inspect a run with redis-cli"). Liveness keys carry a TTL and are refreshed by a heartbeat
thread, so a dead process disappears by itself (rq's worker keys work the same way).

Nothing here sits on the per-step hot path: roles write progress at most once per step from the
silo (optional, ``report_loss``) and round transitions from the broker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis

from shared.state.redis_acl import shown_url
from shared.state.run_config import canonical_json, config_digest, read_reference

log = logging.getLogger(__name__)

ROLES = ("silo", "trunk", "broker")


class RegistryError(RuntimeError):
    pass


class Registry:
    def __init__(self, url: str, prefix: str, run_id: str) -> None:
        self.url = url
        self.prefix = prefix
        self.run_id = run_id
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)

    # ------------------------------------------------------------------ keys
    def key(self, *parts: object) -> str:
        return ":".join([self.prefix, "run", self.run_id, *map(str, parts)])

    def ping(self) -> None:
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise RegistryError(f"Redis at {shown_url(self.url)} does not answer: {exc}") from exc

    # ------------------------------------------------------------------ run
    def create_run(self, meta: Mapping[str, Any]) -> None:
        fields = {k: str(v) for k, v in meta.items()}
        fields.setdefault("created_at", f"{time.time():.3f}")
        pipe = self.redis.pipeline()
        pipe.hset(self.key("meta"), mapping=fields)
        pipe.hset(self.key("round"), mapping={"round": 0, "state": "training", "committed": -1})
        pipe.sadd(f"{self.prefix}:runs", self.run_id)  # lets `splitfed status` list runs
        pipe.execute()

    def list_run(self) -> None:
        self.redis.sadd(f"{self.prefix}:runs", self.run_id)

    def run_meta(self) -> dict[str, str]:
        return self.redis.hgetall(self.key("meta"))

    def run_config(self) -> dict[str, Any] | None:
        """The run's reference config (shared/state/run_config.py), None if none is recorded yet."""
        return read_reference(self.redis.hget(self.key("meta"), "config"))

    def claim_run_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Add the fields of ``config`` that the run's reference lacks (the first role to set a field
        sets it for the run) and return the reference. Atomic (WATCH): two roles starting at once
        cannot both set a field."""
        key = self.key("meta")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    reference = read_reference(pipe.hget(key, "config")) or {}
                    merged = {**config, **reference}
                    if merged == reference:
                        pipe.unwatch()
                        return reference
                    pipe.multi()
                    pipe.hset(key, mapping={"config": canonical_json(merged), "config_digest": config_digest(merged)})
                    pipe.execute()
                    return merged
                except redis.WatchError:
                    continue

    def set_run_status(self, status: str) -> None:
        self.redis.hset(self.key("meta"), "status", status)

    # ------------------------------------------------------------------ rounds
    def round_state(self) -> dict[str, str]:
        return self.redis.hgetall(self.key("round"))

    def commit_round(self, round_no: int, next_state: str = "training") -> None:
        """Round ``round_no`` is complete everywhere: record it and open the next one."""
        self.redis.hset(
            self.key("round"),
            mapping={"committed": round_no, "round": round_no + 1, "state": next_state, "updated_at": f"{time.time():.3f}"},
        )

    def committed_round(self) -> int:
        """The last round every role holds a checkpoint of (-1: none yet)."""
        value = self.redis.hget(self.key("round"), "committed")
        return -1 if value is None else int(value)

    def broker_epoch(self) -> int:
        """Count the broker's starts for this run: more than 1 means it restarted mid-run."""
        return int(self.redis.incr(self.key("broker_epoch")))

    def count_rollback(self) -> None:
        self.redis.hincrby(self.key("round"), "rollbacks", 1)

    def finish_rounds(self) -> None:
        """Every silo has left: no round is open any more."""
        self.redis.hset(self.key("round"), mapping={"state": "finished", "updated_at": f"{time.time():.3f}"})

    # ------------------------------------------------------------------ membership and liveness
    def join(self, role: str, member: str, **fields: Any) -> None:
        """Record a member; its pid and host go along so an operator can find the process."""
        _check_role(role)
        fields = {"status": "joined", "pid": os.getpid(), "host": socket.gethostname(), **fields}
        pipe = self.redis.pipeline()
        pipe.sadd(self.key("members", role), member)
        pipe.hset(self.key(role, member), mapping={k: str(v) for k, v in fields.items()})
        pipe.execute()

    def leave(self, role: str, member: str, status: str = "left") -> None:
        _check_role(role)
        pipe = self.redis.pipeline()
        pipe.hset(self.key(role, member), "status", status)
        pipe.delete(self.key("alive", role, member))
        pipe.execute()

    def members(self, role: str) -> list[str]:
        _check_role(role)
        return sorted(self.redis.smembers(self.key("members", role)))

    def heartbeat(self, role: str, member: str, ttl_s: int) -> None:
        self.redis.set(self.key("alive", role, member), f"{time.time():.3f}", ex=ttl_s)

    def alive(self, role: str, member: str) -> bool:
        return bool(self.redis.exists(self.key("alive", role, member)))

    def update(self, role: str, member: str, **fields: Any) -> None:
        _check_role(role)
        self.redis.hset(self.key(role, member), mapping={k: str(v) for k, v in fields.items()})

    def info(self, role: str, member: str) -> dict[str, str]:
        return self.redis.hgetall(self.key(role, member))

    # ------------------------------------------------------------------ silo -> trunk worker
    def assign(self, silo: str, worker: str) -> None:
        """Record which trunk worker serves a silo (hierarchical mode; `redis-cli hgetall ...:assign`)."""
        self.redis.hset(self.key("assign"), silo, worker)

    def assignments(self) -> dict[str, str]:
        return self.redis.hgetall(self.key("assign"))

    # ------------------------------------------------------------------ rejected frames
    def count_rejected(self, reason: str) -> None:
        try:
            self.redis.hincrby(self.key("rejected"), reason, 1)
        except redis.RedisError as exc:  # counting must never take a role down
            log.warning("could not count rejected frame (%s): %s", reason, exc)

    def count_rejected_many(self, counts: dict[str, int]) -> None:
        """Add several reasons' counts in one round trip (the broker's batched writes). Raises RedisError."""
        pipe = self.redis.pipeline(transaction=False)
        for reason, n in counts.items():
            pipe.hincrby(self.key("rejected"), reason, n)
        pipe.execute()

    def rejected(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self.key("rejected")).items()}

    # ------------------------------------------------------------------ cleanup
    def run_keys(self) -> list[str]:
        return list(self.redis.scan_iter(match=self.key("*"), count=500))

    def delete_run(self) -> int:
        """Delete every key of this run (and only this run's)."""
        keys = self.run_keys()
        if keys:
            self.redis.delete(*keys)
        self.redis.srem(f"{self.prefix}:runs", self.run_id)
        return len(keys)

    def expire_run(self, seconds: int) -> None:
        """Keep a finished run inspectable for a while, then let Redis drop it."""
        pipe = self.redis.pipeline()
        for k in self.run_keys():
            pipe.expire(k, seconds)
        pipe.execute()


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")


def retry_redis(fn, *args, attempts: int = 60, delay_s: float = 0.25):
    """Call ``fn`` until Redis answers (it may be restarting); give up after about attempts*delay_s."""
    for attempt in range(attempts):
        try:
            return fn(*args)
        except redis.RedisError as exc:
            if attempt == attempts - 1:
                raise
            log.warning("Redis unavailable, retrying: %s", exc)
            time.sleep(delay_s)


class Heartbeat:
    """Background thread refreshing a liveness key (redis-py clients are thread-safe)."""

    def __init__(self, registry: Registry, role: str, member: str, period_s: float, ttl_s: int,
                 status_fn=None) -> None:
        """``status_fn() -> dict``, when given, is published to the member's hash at each beat
        (live load for `splitfed status`, off the step's hot path)."""
        self._registry, self._role, self._member = registry, role, member
        self._status_fn = status_fn
        self._period, self._ttl = period_s, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{role}-{member}", daemon=True)

    def start(self) -> Heartbeat:
        self._registry.heartbeat(self._role, self._member, self._ttl)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._registry.heartbeat(self._role, self._member, self._ttl)
                status = self._status_fn() if self._status_fn is not None else None
                if status:
                    self._registry.update(self._role, self._member, **status)
            except redis.RedisError as exc:
                log.warning("heartbeat to Redis failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
