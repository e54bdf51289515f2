"""The Markdown table and the issue's goal check of `splitfed bench wan` (from its JSON document)."""

from __future__ import annotations

GOAL = {"model": "smollm2", "mode": "serial", "metro": 0.9, "wan": 0.7,
        "note": "samples/s vs loopback, with latency hiding (micro-batches) on; the figure without it beside"}


def goal_check(runs: list[dict]) -> dict:
    """Per silo count: SmolLM2 serial with and without micro-batches, and whether the goal is met."""
    out = {}
    for r in runs:
        if r["model"] != GOAL["model"] or r["mode"] != GOAL["mode"]:
            continue
        key = f"{r['silos']}_silos"
        side = "with_micro_batches" if r["micro_batches"] > 1 else "without_micro_batches"
        got = {p: r["vs_loopback"].get(p) for p in ("metro", "wan")}
        entry = out.setdefault(key, {})
        entry[side] = {"micro_batches": r["micro_batches"], **got}
        if r["micro_batches"] > 1:
            entry["met"] = all(got[p] is not None and got[p] >= GOAL[p] for p in ("metro", "wan"))
            entry["short_by"] = {p: round(GOAL[p] - got[p], 3) for p in ("metro", "wan")
                                 if got[p] is not None and got[p] < GOAL[p]}
    return out


def markdown_table(doc: dict) -> str:
    names = [p["name"] for p in doc["profiles"] if p["name"] != "loopback"]
    rtts = {p["name"]: p for p in doc["profiles"]}
    head = " | ".join(f"{n} ({rtts[n]['added_rtt_ms']:g} ms RTT, {_rate(rtts[n]['rate_mbit'])})" for n in names)
    lines = [f"| model | mode | silos | micro-batches | loopback samples/s | {head} | loopback drift |",
             "|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for r in doc["runs"]:
        v = r["vs_loopback"]
        cells = " | ".join(_cell(v, n) for n in names)
        drift = f"{100 * v['loopback_drift']:.0f}%" if v.get("loopback_drift") is not None else "n/a"
        lines.append(f"| {r['model']} | {r['mode']} | {r['silos']} | {r['micro_batches']} | "
                     f"{v['loopback_samples_per_s']:.2f} | {cells} | {drift} |")
    if doc.get("links"):
        lines += ["", "| link, measured from a silo namespace | round trip ms (median) | bulk Mbit/s each way |",
                  "|---|---|---|"]
        for row in doc["links"]:
            lines.append(f"| {row['path']} | {row['rtt_ms_median']:.2f} | {row['bulk_mbit_per_s_each_way']:.0f} |")
    if doc.get("relay_overhead"):
        lines += ["", "| relay's own cost: model | mode | silos | direct samples/s | via relay at 0 ms | ratio |",
                  "|---|---|---|---|---|---|"]
        for o in doc["relay_overhead"]:
            ratio = f"{o['relay_vs_direct']:.2f}x" if o["relay_vs_direct"] is not None else "n/a"
            lines.append(f"| {o['model']} | {o['mode']} | {o['silos']} | {o['direct_samples_per_s']:.2f} | "
                         f"{o['relay_0ms_samples_per_s']:.2f} | {ratio} |")
    return "\n".join(lines)


def _cell(v: dict, name: str) -> str:
    """The median ratio, and its range when the profile ran more than once."""
    if v.get(name) is None:
        return "n/a"
    each = v.get("each", {}).get(name, [])
    spread = f" ({min(each):.2f}-{max(each):.2f})" if len(each) > 1 else ""
    return f"{v[name]:.2f}x{spread}"


def _rate(mbit: float | None) -> str:
    if mbit is None:
        return "no limit"
    return f"{mbit / 1000:g} Gbit/s" if mbit >= 1000 else f"{mbit:g} Mbit/s"
