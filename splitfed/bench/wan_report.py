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
        expected = {p: r.get("expected_vs_loopback", {}).get(p) for p in ("metro", "wan")}
        entry = out.setdefault(key, {})
        entry[side] = {"micro_batches": r["micro_batches"], **got, "network_cost_alone": expected}
        if r["micro_batches"] > 1:
            entry["met"] = all(got[p] is not None and got[p] >= GOAL[p] for p in ("metro", "wan"))
            entry["short_by"] = {p: round(GOAL[p] - got[p], 3) for p in ("metro", "wan")
                                 if got[p] is not None and got[p] < GOAL[p]}
            entry["met_by_network_cost_alone"] = all(expected[p] is not None and expected[p] >= GOAL[p]
                                                     for p in ("metro", "wan"))
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
    if any("expected_vs_loopback" in r for r in doc["runs"]):
        lines += ["", "| network cost alone (expected): model | mode | silos | micro-batches | loopback s per trunk step "
                  "| exposed round trips | " + " | ".join(f"{n} (no overlap)" for n in names) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(names)]
        for r in doc["runs"]:
            e = r.get("expected_vs_loopback")
            if e:
                cells = " | ".join(f"{e[n]:.2f}x ({e[n + '_no_overlap']:.2f}x)" if n in e else "n/a" for n in names)
                lines.append(f"| {r['model']} | {r['mode']} | {r['silos']} | {r['micro_batches']} | "
                             f"{e['loopback_s_per_trunk_step']:.3f} | {e['exposed_round_trips']} | {cells} |")
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


def exposed_round_trips(mode: str, silos: int, micro_batches: int) -> int:
    """Round trips per trunk step that today's schedules leave the trunk idle for, at best.

    serial: a turn waits once for FORWARD_RESULT -> tail -> BACKWARD (the turnaround), and the next
    step of the same silo waits for BACKWARD_RESULT -> optimizer -> head -> FORWARD (the boundary).
    Micro-batches keep the trunk busy through the turnaround when deep enough (1 + RTT / trunk time
    per micro-batch); with several silos the broker already holds the next silo's FORWARDs, so the
    boundary is hidden. client-batch: every silo waits for its BACKWARD_RESULT before its next
    FORWARD, and a batch waits for all silos: the boundary always; the turnaround too unless
    micro-batches keep the trunk busy with the next pieces' batches."""
    if mode != "serial":
        return 1 if micro_batches > 1 else 2
    return (0 if micro_batches > 1 else 1) + (1 if silos == 1 else 0)


def expected_ratios(doc: dict, hidden_sizes: dict[str, int]) -> None:
    """Beside each measured ratio, what the network alone would cost: per trunk step (serial: per
    turn; client-batch: per batch, the silos' links in parallel) the round trips the schedule
    leaves exposed (``exposed_round_trips``; ``no_overlap``: both, always) and the four [B, T, H]
    fp32 tensors at the profile's rate, both as the link probe measured them against the relay at
    0 ms, added to the loopback phases' time per trunk step. T is --max-length (an upper bound;
    batches are padded to their longest example only); transfers are never assumed hidden. On a
    crowded machine this is the steadier figure; the measured one shows what this machine did."""
    links = {row["path"]: row for row in doc.get("links", [])}
    base = links.get("relay at 0 ms")
    if base is None:
        return
    for run in doc["runs"]:
        rate = run["vs_loopback"]["loopback_samples_per_s"]
        if not rate or run["model"] not in hidden_sizes:
            continue
        per_step_s = doc["batch_size"] * (run["silos"] if run["mode"] == "client-batch" else 1) / rate
        bits = 4 * doc["batch_size"] * doc["max_length"] * hidden_sizes[run["model"]] * 4 * 8
        trips = exposed_round_trips(run["mode"], run["silos"], run["micro_batches"])
        expected = {"loopback_s_per_trunk_step": round(per_step_s, 4), "exposed_round_trips": trips}
        for name, link in links.items():
            if name in ("direct", "relay at 0 ms"):
                continue
            rtt = (link["rtt_ms_median"] - base["rtt_ms_median"]) / 1000
            transfer = bits / 1e6 * max(0.0, 1 / link["bulk_mbit_per_s_each_way"] - 1 / base["bulk_mbit_per_s_each_way"])
            expected[name] = round(per_step_s / (per_step_s + trips * rtt + transfer), 3)
            expected[f"{name}_no_overlap"] = round(per_step_s / (per_step_s + 2 * rtt + transfer), 3)
        run["expected_vs_loopback"] = expected
