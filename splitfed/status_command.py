"""`splitfed status`: a live table of a run from Redis (or the list of runs), for operators.

Reads only what the roles already publish (key schema: README, "Inspect a run with redis-cli"):
run meta, round state, each member's hash, liveness keys (value = unix time of the last heartbeat,
gone when the process dies) and the rejected-frame counters. Read-only: it never writes to Redis.

Kept cheap to start (no torch, no model code): it is run in a loop by `--watch` and by people in a
hurry. That is why the Redis options come from the small ``StatusSettings`` below rather than
``shared.runtime.settings.CommonSettings``, whose module imports torch through ``shared.wire.wire``; a test
keeps the two in step.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import redis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.runtime import exit_codes
from shared.state.redis_acl import shown_url
from shared.runtime.cli_options import build_settings, settings_options
from shared.state.registry import Registry

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


class StatusSettings(BaseSettings):
    """Where the runs live: the same variables (and defaults) as the roles' CommonSettings."""

    model_config = SettingsConfigDict(env_prefix="SPLITFED_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding run state and membership")
    key_prefix: str = Field("splitfed", description="namespace of every Redis key this run writes")


# ---------------------------------------------------------------------------------------- snapshot
def _num(value: str | None, kind: type = float) -> Any:
    try:
        return kind(value) if value not in (None, "") else None
    except ValueError:
        return None


def _age(stamp: str | None, now: float) -> float | None:
    t = _num(stamp)
    return None if t is None else round(max(0.0, now - t), 3)


def list_runs(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Every run under ``prefix``, newest first: ids from ``{prefix}:runs`` and any run meta key
    (a run created by hand with redis-cli HSET is not in the set)."""
    ids = set(client.smembers(f"{prefix}:runs"))
    for key in client.scan_iter(match=f"{prefix}:run:*:meta", count=500):
        ids.add(key[len(f"{prefix}:run:") : -len(":meta")])
    pipe = client.pipeline()
    ordered = sorted(ids)
    for run in ordered:
        base = f"{prefix}:run:{run}"
        pipe.hgetall(f"{base}:meta")
        pipe.hgetall(f"{base}:round")
        pipe.get(f"{base}:alive:broker:broker")
    replies = pipe.execute()
    now, runs = time.time(), []
    for i, run in enumerate(ordered):
        meta, rnd, broker_beat = replies[3 * i : 3 * i + 3]
        if not meta and not rnd:
            continue  # an id left in the set after the run's keys expired
        runs.append({
            "run_id": run,
            "mode": meta.get("mode"),
            "status": meta.get("status"),
            "silos": [s for s in meta.get("silos", "").split(",") if s],
            "model": meta.get("model"),
            "created_at": _num(meta.get("created_at")),
            "round": _num(rnd.get("round"), int),
            "state": rnd.get("state"),
            "committed": _num(rnd.get("committed"), int),
            "broker_alive": broker_beat is not None,
            "broker_heartbeat_age_s": _age(broker_beat, now),
        })
    runs.sort(key=lambda r: (r["created_at"] is not None, r["created_at"] or 0, r["run_id"]), reverse=True)
    return runs


def snapshot(registry: Registry) -> dict[str, Any]:
    """One consistent-enough read of a run (one pipeline round trip after the membership reads)."""
    r = registry.redis
    meta = registry.run_meta()
    silos = list(dict.fromkeys([s for s in meta.get("silos", "").split(",") if s] + registry.members("silo")))
    trunks = registry.members("trunk")
    members = [("broker", "broker")] + [("silo", s) for s in silos] + [("trunk", t) for t in trunks]
    pipe = r.pipeline()
    pipe.hgetall(registry.key("round"))
    pipe.hgetall(registry.key("rejected"))
    pipe.hgetall(registry.key("assign"))
    for role, member in members:
        pipe.hgetall(registry.key(role, member))
        pipe.get(registry.key("alive", role, member))
    rnd, rejected, assigned, *rest = pipe.execute()
    now = time.time()

    def member(i: int, role: str, name: str) -> dict[str, Any]:
        info, beat = rest[2 * i], rest[2 * i + 1]
        return {"id": name, "status": info.get("status"), "alive": beat is not None,
                "heartbeat_age_s": _age(beat, now), "host": info.get("host"), "pid": _num(info.get("pid"), int),
                "_info": info}

    broker = member(0, "broker", "broker")
    broker.update(mode=broker["_info"].get("mode"), frontend=broker["_info"].get("frontend"))
    silo_rows = []
    for j, name in enumerate(silos, start=1):
        m = member(j, "silo", name)
        info = m["_info"]
        step = _num(info.get("step"), int)
        m.update(round=_num(info.get("round"), int), step=step, steps=_num(info.get("steps"), int),
                 steps_done=None if step is None else step + 1, loss=_num(info.get("loss")),
                 samples=_num(info.get("samples"), int), updated_age_s=_age(info.get("updated_at"), now),
                 worker=assigned.get(name))
        silo_rows.append(m)
    trunk_rows = []
    for j, name in enumerate(trunks, start=1 + len(silos)):
        m = member(j, "trunk", name)
        info = m["_info"]
        m.update(device=info.get("device"), adapter=info.get("adapter"), updates=_num(info.get("updates"), int))
        trunk_rows.append(m)
    for m in [broker, *silo_rows, *trunk_rows]:
        del m["_info"]
    return {
        "run_id": registry.run_id,
        "key_prefix": registry.prefix,
        "time": round(now, 3),
        "exists": bool(meta or rnd or members[1:] or rejected),
        "meta": meta,
        "round": {"round": _num(rnd.get("round"), int), "state": rnd.get("state"),
                  "committed": _num(rnd.get("committed"), int), "updated_age_s": _age(rnd.get("updated_at"), now)},
        "broker": broker,
        "silos": silo_rows,
        "trunks": trunk_rows,
        "rejected": {k: int(v) for k, v in sorted(rejected.items())},
    }


# ---------------------------------------------------------------------------------------- rendering
def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None or v == "" else format(v, spec)


def _ago(age: float | None) -> str:
    if age is None:
        return "-"
    if age < 60:
        return f"{age:.1f}s ago"
    if age < 3600:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.1f}h ago"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _heartbeat(m: dict[str, Any]) -> str:
    if m["alive"]:
        return _ago(m["heartbeat_age_s"])
    return "dead" if m["status"] == "joined" else "-"  # joined but no heartbeat key: it died


def render(snap: dict[str, Any]) -> str:
    meta, rnd, b = snap["meta"], snap["round"], snap["broker"]
    created = _num(meta.get("created_at"))
    out = [
        f"run {snap['run_id']}  mode {_fmt(meta.get('mode'))}  status {_fmt(meta.get('status'))}"
        f"  model {_fmt(meta.get('model'))}  created "
        + ("-" if created is None else f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(created))} "
           f"({_ago(snap['time'] - created)})"),
        f"round {_fmt(rnd['round'])}  state {_fmt(rnd['state'])}  committed {_fmt(rnd['committed'])}"
        + (f"  (updated {_ago(rnd['updated_age_s'])})" if rnd["updated_age_s"] is not None else ""),
        f"broker {'alive, heartbeat ' + _ago(b['heartbeat_age_s']) if b['alive'] else 'not alive'}"
        f"  status {_fmt(b['status'])}  mode {_fmt(b['mode'])}  host {_fmt(b['host'])}",
        "",
    ]
    silo_rows = [[s["id"], _fmt(s["status"]), _fmt(s["round"]),
                  "-" if s["steps_done"] is None else f"{s['steps_done']}/{_fmt(s['steps'])}",
                  _fmt(s["loss"], ".4f"), _heartbeat(s), _ago(s["updated_age_s"]), _fmt(s["worker"]), _fmt(s["host"])]
                 for s in snap["silos"]]
    out.append(_table(["SILO", "STATUS", "ROUND", "STEPS", "LOSS", "HEARTBEAT", "LAST STEP", "WORKER", "HOST"], silo_rows)
               if silo_rows else "no silos")
    out.append("")
    trunk_rows = [[t["id"], _fmt(t["status"]), _fmt(t["device"]), _fmt(t["adapter"]), _fmt(t["updates"]),
                   _heartbeat(t), _fmt(t["host"])] for t in snap["trunks"]]
    out.append(_table(["TRUNK", "STATUS", "DEVICE", "ADAPTER", "UPDATES", "HEARTBEAT", "HOST"], trunk_rows)
               if trunk_rows else "no trunk workers")
    out.append("")
    rej = snap["rejected"]
    out.append("rejected frames: " + (", ".join(f"{k}={v}" for k, v in rej.items()) if rej else "none"))
    return "\n".join(out)


def render_runs(runs: list[dict[str, Any]], prefix: str) -> str:
    if not runs:
        return f"no runs under key prefix {prefix!r}"
    now = time.time()
    rows = [[r["run_id"], _fmt(r["mode"]), _fmt(r["status"]), str(len(r["silos"])), _fmt(r["model"]),
             _fmt(r["round"]), _fmt(r["state"]), _fmt(r["committed"]),
             "alive" if r["broker_alive"] else "-",
             "-" if r["created_at"] is None else _ago(now - r["created_at"])] for r in runs]
    return _table(["RUN", "MODE", "STATUS", "SILOS", "MODEL", "ROUND", "STATE", "COMMITTED", "BROKER", "CREATED"], rows)


# ---------------------------------------------------------------------------------------- command
@click.command("status")
@click.option("--run", "run", default=None, help="the run to show (default: list the runs, newest first)")
@click.option("--watch", is_flag=True, help="refresh every --interval seconds until Ctrl+C")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="seconds between refreshes with --watch")
@click.option("--json", "as_json", is_flag=True,
              help="machine-readable output (with --watch: one JSON document per line)")
@settings_options(StatusSettings)
def status(run: str | None, watch: bool, interval: float, as_json: bool, **options: Any) -> None:
    """A live table of a run from Redis: round and its state, each silo's step, loss and last
    heartbeat, each trunk worker, the broker, rejected-frame counters. Without --run: the runs."""
    settings = build_settings(StatusSettings, options)
    registry = Registry(settings.redis_url, settings.key_prefix, run or "-")
    tty = sys.stdout.isatty()

    def once() -> str:
        if run is None:
            runs = list_runs(registry.redis, settings.key_prefix)
            return json.dumps(runs, indent=None if watch else 1) if as_json else render_runs(runs, settings.key_prefix)
        snap = snapshot(registry)
        if not snap["exists"] and not watch:
            click.echo(f"Error: no run {run!r} under key prefix {settings.key_prefix!r} "
                       f"(`splitfed status` lists the runs)", err=True)
            sys.exit(exit_codes.CONFIG)
        return json.dumps(snap, indent=None if watch else 1) if as_json else render(snap)

    if not watch:
        try:
            click.echo(once())
        except redis.RedisError as exc:
            click.echo(f"Error: Redis at {shown_url(settings.redis_url)} does not answer: {exc}", err=True)
            sys.exit(exit_codes.REDIS_UNAVAILABLE)
        return
    try:
        while True:
            try:
                text = once()
            except redis.RedisError as exc:  # keep watching through a Redis restart
                text = json.dumps({"error": str(exc)}) if as_json else f"Redis at {settings.redis_url}: {exc}"
            if tty and not as_json:
                text = CLEAR + time.strftime("%H:%M:%S  ") + "(Ctrl+C to stop)\n" + text
            elif not as_json:
                text += "\n"
            click.echo(text)
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
