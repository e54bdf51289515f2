"""Network profiles of `splitfed bench wan`, and samples/s per profile phase from the silos' step ends.

A profile is what a silo's link to the server looks like: a one-way delay (held by the relay in
each direction, so the round trip grows by twice it, as `tc netem delay` on both ends of a link
would) and a rate (tbf on both veth ends; None: unlimited). One federation runs through several
profiles in turn ("phases"), switched between steps while it trains, so every profile is measured
by the same processes under the same machine load and compared to the loopback phases around it.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    delay_ms: float  # one way, each direction: the round trip adds 2 x delay_ms
    rate_mbit: float | None  # each direction; None = no limit

    def as_dict(self) -> dict:
        return {**asdict(self), "added_rtt_ms": 2 * self.delay_ms}


LOOPBACK = Profile("loopback", 0.0, None)
PROFILES = {p.name: p for p in (LOOPBACK, Profile("lan", 0.5, 10_000.0), Profile("metro", 10.0, 1_000.0),
                                Profile("wan", 50.0, 200.0))}


def phase_plan(names: list[str], cycles: int = 1) -> list[Profile]:
    """A loopback phase before and after every profile, the whole sequence ``cycles`` times: the
    machine is shared, its load drifts within minutes, so each profile is compared with the
    loopback phases right around it (a drift that is linear in time cancels), and repeated."""
    plan = [LOOPBACK]
    for _ in range(cycles):
        for name in names:
            if name != "loopback":
                plan += [PROFILES[name], LOOPBACK]
    return plan


def phase_throughput(ends: dict[str, list[float]], start: float, stop: float, batch_size: int) -> dict:
    """samples/s over [start, stop] from each silo's step end times (wall clock).

    Only steps that began and ended inside the phase count: for each silo, the intervals between
    consecutive step ends that both lie in it (the step under way when the profile changed is
    dropped). A silo's rate is its batch over the median interval: other jobs on this shared
    machine stall a step now and then, and a median does not let one stalled step decide a phase
    (the mean rate is kept beside). The silos' rates add up (serial: each silo's interval is a
    whole cycle of turns; client-batch: every silo advances once per trunk batch)."""
    total, mean_total, intervals = 0.0, 0.0, {}
    for sid, times in ends.items():
        inside = sorted(t for t in times if start <= t <= stop)
        if len(inside) < 2:
            continue
        gaps = [b - a for a, b in zip(inside, inside[1:])]
        total += batch_size / statistics.median(gaps)
        mean_total += len(gaps) * batch_size / (inside[-1] - inside[0])
        intervals[sid] = [round(g, 3) for g in gaps]
    return {"samples_per_s": round(total, 3), "samples_per_s_mean": round(mean_total, 3),
            "step_intervals": sum(len(g) for g in intervals.values()), "intervals_s": intervals,
            "seconds": round(stop - start, 2)}


def ratios(phases: list[dict]) -> dict:
    """Each profile's samples/s over the mean of the loopback phases next to it, by profile name
    (the median over its phases when it ran more than once; every phase's ratio under
    ``each``); the mean of all loopback phases and their spread (max/min - 1) beside."""
    loop = [p["samples_per_s"] for p in phases if p["profile"] == "loopback" and p["samples_per_s"] > 0]
    out = {"loopback_samples_per_s": round(sum(loop) / len(loop), 3) if loop else 0.0,
           "loopback_drift": round(max(loop) / min(loop) - 1, 3) if len(loop) > 1 else None}
    each: dict[str, list[float]] = {}
    for i, p in enumerate(phases):
        if p["profile"] == "loopback":
            continue
        near = [q["samples_per_s"] for q in phases[max(0, i - 1):i + 2]
                if q["profile"] == "loopback" and q["samples_per_s"] > 0]
        each.setdefault(p["profile"], [])
        if near:
            each[p["profile"]].append(round(p["samples_per_s"] / (sum(near) / len(near)), 3))
    for name, values in each.items():
        out[name] = round(statistics.median(values), 3) if values else None
    out["each"] = each
    return out
