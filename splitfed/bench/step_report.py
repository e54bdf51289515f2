"""Numbers of `splitfed bench step` from the roles' per-step timelines (shared/runtime/step_timeline.py).

The split step's wall time (the silo's, step start to optimizer step) is cut into parts that add
up to it exactly:

    silo compute    = silo wall - silo socket time - silo codec time
    serialization   = codec time minus cipher time, silo + trunk (headers, validation, tensor views)
    crypto          = time inside AES-GCM, silo + trunk
    trunk compute   = trunk busy - trunk socket time - trunk codec time
    transport       = silo socket time - trunk busy + trunk socket time: ZeroMQ and TCP through the
                      broker both ways, and the processes waking up (scheduling on a loaded host)

``silo_waiting`` (informational, not a part) is the silo's socket time: how long it sat idle
while the trunk and the transport worked.
"""

from __future__ import annotations

import statistics


def breakdown(silo: dict, trunk: dict) -> dict[str, float]:
    """Seconds of one step by part (see module doc); the values sum to the silo's wall time."""
    return {
        "silo_compute": silo["wall"] - silo["io"] - silo["encode"] - silo["decode"],
        "trunk_compute": trunk["busy"] - trunk["io"] - trunk["encode"] - trunk["decode"],
        "serialization": silo["encode"] + silo["decode"] - silo["crypto"] + trunk["encode"] + trunk["decode"]
        - trunk["crypto"],
        "crypto": silo["crypto"] + trunk["crypto"],
        "transport": silo["io"] - trunk["busy"] + trunk["io"],
    }


def _median(values) -> float:
    return statistics.median(values)


def summarize(silo_rows: list[dict], trunk_rows: list[dict], central_times: dict[int, float],
              central_losses: dict[int, float], split_losses: dict[int, float], warmup: int,
              ideal_bytes: dict[int, int]) -> dict:
    """``ideal_bytes[step]``: 4*B*T*H*itemsize of the step's padded batch (T varies with the data)."""
    trunk_by_step = {r["step"]: r for r in trunk_rows}
    timed = [r for r in silo_rows if r["step"] >= warmup and r["step"] in trunk_by_step and r["step"] in central_times]
    if not timed:
        raise ValueError("no timed step has a silo row, a trunk row and a centralized time")
    split = [r["wall"] for r in timed]
    central = [central_times[r["step"]] for r in timed]
    parts = [breakdown(r, trunk_by_step[r["step"]]) for r in timed]
    names = list(parts[0])
    diffs = [abs(split_losses[s] - central_losses[s]) for s in sorted(central_losses) if s in split_losses]
    return {
        "timed_steps": len(timed),
        "split_s": round(_median(split), 5),
        "centralized_s": round(_median(central), 5),
        "ratio": round(_median(split) / _median(central), 4),
        # the median of per-step ratios: each pair ran back to back, under the same load
        "paired_ratio": round(_median([s / c for s, c in zip(split, central)]), 4),
        "breakdown_ms": {k: round(1000 * _median([p[k] for p in parts]), 2) for k in names},
        "breakdown_share": {k: round(sum(p[k] for p in parts) / sum(split), 4) for k in names},
        "silo_waiting_ms": round(1000 * _median([r["io"] for r in timed]), 2),
        "bytes_per_step": int(_median([r["sent"] + r["received"] for r in timed])),
        "bytes_ideal": int(_median([ideal_bytes[r["step"]] for r in timed])),
        "bytes_vs_ideal": round(max((r["sent"] + r["received"]) / ideal_bytes[r["step"]] for r in timed), 4),
        "buffer_allocations_per_step": {
            "silo": max(r["allocations"] for r in timed),
            "trunk": max(trunk_by_step[r["step"]]["allocations"] for r in timed)},
        "loss_diff": {"max": max(diffs), "mean": sum(diffs) / len(diffs), "steps": len(diffs)},
        "losses": {"split": [split_losses[s] for s in sorted(split_losses)],
                   "centralized": [central_losses[s] for s in sorted(central_losses)]},
    }
