"""`splitfed bench wan`: samples/s over emulated networks, as a ratio to loopback in the same run.

Every federation is real (OS processes, ZeroMQ over TCP, encryption on) and runs in network
namespaces: the server side in one, each silo in its own behind one veth link
(splitfed/demo/netns.py). netem is NOT available in this kernel ("Specified qdisc kind is
unknown"), so a profile is emulated by two parts: tbf on both veth ends of every silo link for the
rate, and a delaying TCP relay in the server's namespace, between each silo and the broker, for the
latency (splitfed/bench/wan_relay.py; one-way delay each direction). Each federation trains through
loopback, profile, loopback, profile, ..., loopback (splitfed/bench/wan_profiles.py), so every ratio
compares the same processes under the load of the same minutes of a shared machine. The relay's own cost and the emulation itself
are measured first from a silo's namespace (splitfed/bench/wan_probe.py: round trip and bulk rate,
direct and through the relay for each profile); a federation also runs once without any relay
("direct") beside the relayed one's loopback phases.

Each mode runs twice: without micro-batches and with ``--micro-batches`` (default: the batch size,
one example each), the silo's latency hiding (silo_agent/microbatch.py; in client-batch mode every
silo's k-th piece shares the step's k-th trunk batch). The depth that would cover one WAN round
trip, 1 + RTT / trunk time per micro-batch, is computed from the run's own trunk timeline and
reported beside the depth used. (``--micro-batches auto`` measures once, at the start of a run; a
bench federation changes its link in place, so it runs fixed depths.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from shared.model.models import resolve_model_dir
from splitfed.bench.wan_profiles import LOOPBACK, PROFILES, phase_plan, ratios
from shared.model.part_loading import load_config
from splitfed.bench.wan_report import GOAL, expected_ratios, goal_check, markdown_table
from splitfed.bench.wan_probe import probe_links
from splitfed.bench.wan_run import echo, run_config, run_phases
from splitfed.demo.runner import free_ports

EMULATION = ("netem is unavailable in this kernel (`tc qdisc add ... netem`: 'Specified qdisc kind is unknown'); "
             "rate: tbf on both veth ends of each silo link; delay: a userspace TCP relay in the server namespace "
             "between each silo and the broker, holding every chunk for the one-way delay in each direction "
             "(added round trip = 2 x delay_ms), order kept, 16 MiB bounded queue per direction")


def _save_partial(doc: dict, out_path: Path | None) -> None:
    """A long bench on a shared machine: what is measured so far survives a failure later on."""
    if out_path is not None:
        out_path.with_suffix(".partial.json").write_text(json.dumps(doc, indent=1))


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 1,2,4") from None


def _per_model(text: str, models: list[str], name: str, least: int) -> dict[str, int]:
    values = _ints(text)
    if len(values) not in (1, len(models)) or min(values, default=0) < least:
        raise click.BadParameter(f"one number >= {least}, or one per --model", param_hint=name)
    return dict(zip(models, values * len(models) if len(values) == 1 else values))


@click.command("wan")
@click.option("--model", "models", default="tiny-256,smollm2", show_default=True, help="comma-separated models")
@click.option("--modes", default="serial,client-batch", show_default=True)
@click.option("--silos", "silos_text", default="1,2,4", show_default=True, help="comma-separated silo counts")
@click.option("--profiles", default="lan,metro,wan", show_default=True,
              help=f"comma-separated, of {', '.join(p for p in PROFILES if p != 'loopback')}")
@click.option("--batch-size", type=click.IntRange(1), default=2, show_default=True, help="per silo")
@click.option("--max-length", type=click.IntRange(8), default=64, show_default=True)
@click.option("--micro-batches", type=click.IntRange(0), default=None,
              help="the latency hiding runs: micro-batches per step (default: the batch size; 0: no such runs)")
@click.option("--warmup-steps", type=click.IntRange(1), default=3, show_default=True,
              help="steps per silo before the first phase (start-up, handshake, first allocations)")
@click.option("--steps-per-phase", "steps_text", default="4", show_default=True,
              help="steps each silo takes in every phase (at least 2); one number, or one per --model (e.g. 4,2)")
@click.option("--cycles", "cycles_text", default="1", show_default=True,
              help="times the profile sequence repeats in each federation; one number, or one per --model")
@click.option("--min-phase-s", type=click.FloatRange(0), default=5.0, show_default=True)
@click.option("--max-phase-s", type=click.FloatRange(1), default=180.0, show_default=True)
@click.option("--relay-check/--no-relay-check", default=True, show_default=True,
              help="probe the links first, and run serial 1 silo and client-batch with the most silos without relays")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="write the JSON here (and the Markdown table beside it, .md) instead of stdout")
@click.option("--key-prefix", default="splitfed", show_default=True, envvar="SPLITFED_KEY_PREFIX")
def wan(models: str, modes: str, silos_text: str, profiles: str, batch_size: int, max_length: int,
        micro_batches: int | None, warmup_steps: int, steps_text: str, cycles_text: str, min_phase_s: float,
        max_phase_s: float, relay_check: bool, out_path: Path | None, key_prefix: str) -> None:
    """samples/s per network profile (LAN, metro, WAN) as a ratio to loopback, in network namespaces."""
    from splitfed.bench.command import _emit

    # A SIGTERM unwinds like an exception, so the namespaces, qdiscs and relays are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = [p.strip() for p in profiles.split(",") if p.strip()]
    if unknown := [n for n in names if n not in PROFILES or n == "loopback"]:
        raise click.BadParameter(f"unknown profile(s) {unknown}: choose from {list(PROFILES)[1:]}", param_hint="--profiles")
    counts, mode_list = _ints(silos_text), [m.strip() for m in modes.split(",") if m.strip()]
    if not counts or min(counts) < 1:
        raise click.BadParameter("silo counts >= 1", param_hint="--silos")
    if bad := [m for m in mode_list if m not in ("serial", "client-batch")]:
        raise click.BadParameter(f"{bad}: serial, client-batch", param_hint="--modes")
    depth = batch_size if micro_batches is None else micro_batches
    if depth > batch_size:
        raise click.BadParameter(f"at most the batch size ({batch_size})", param_hint="--micro-batches")
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    steps_per_phase = _per_model(steps_text, model_list, "--steps-per-phase", 2)
    cycles = _per_model(cycles_text, model_list, "--cycles", 1)
    command = " ".join(["splitfed", *sys.argv[1:]]) if sys.argv[1:3] == ["bench", "wan"] else None
    doc = {"bench": "wan", "command": command, "netem_available": False, "emulation": EMULATION,
           "profiles": [PROFILES[n].as_dict() for n in ["loopback", *names]],
           "phases": {m: [p.name for p in phase_plan(names, cycles[m])] for m in model_list},
           "steps_per_phase": steps_per_phase, "batch_size": batch_size, "max_length": max_length,
           "warmup_steps": warmup_steps, "encryption": True, "cpu_count": os.cpu_count(),
           "load_before": [round(x, 2) for x in os.getloadavg()],
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "links": [], "runs": [], "relay_overhead": []}
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-wan-") as tmp:
        if relay_check:
            echo("probing the links from a silo namespace: direct, and through the relay per profile")
            doc["links"] = probe_links([PROFILES[n] for n in ["loopback", *names]], Path(tmp) / "probe",
                                       tuple(free_ports(2)))
            for row in doc["links"]:
                echo(f"  {row['path']}: round trip {row['rtt_ms_median']} ms, {row['bulk_mbit_per_s_each_way']} Mbit/s")
            _save_partial(doc, out_path)
        n = 0
        for model in model_list:
            resolve_model_dir(model)  # build/convert once here, so the roles only load
            phase_args = dict(warmup_steps=warmup_steps, steps_per_phase=steps_per_phase[model],
                              min_phase_s=min_phase_s, max_phase_s=max_phase_s)
            plan = phase_plan(names, cycles[model])
            for silos in counts:
                variants = [(m, d) for m in mode_list for d in ([1, depth] if depth > 1 else [1])]
                for mode, mb in variants:
                    n += 1
                    cfg = run_config(model, mode, silos, batch_size, max_length)
                    echo(f"{model}, {mode}, {silos} silo(s), micro-batches {mb}: phases {[p.name for p in plan]}")
                    run = run_phases(cfg, Path(tmp) / f"run{n}", key_prefix, plan, relay=True, micro_batches=mb,
                                     **phase_args)
                    row = {"model": model, "mode": mode, "silos": silos, "micro_batches": mb, **run,
                           "vs_loopback": ratios(run["phases"])}
                    if mb > 1 and run["trunk_busy_per_step_s"]:
                        per_mb = run["trunk_busy_per_step_s"] / mb
                        rtt = 2 * PROFILES["wan"].delay_ms / 1000
                        row["trunk_s_per_micro_batch"] = round(per_mb, 5)
                        row["depth_to_cover_wan_rtt"] = math.ceil(1 + rtt / per_mb)
                    echo(f"  -> {row['vs_loopback']}")
                    doc["runs"].append(row)
                    _save_partial(doc, out_path)
                    if relay_check and mb == 1 and ((mode == "serial" and silos == min(counts))
                                                    or (mode == "client-batch" and silos == max(counts))):
                        n += 1
                        doc["relay_overhead"].append(_direct(cfg, Path(tmp) / f"run{n}", key_prefix, phase_args, row))
                        _save_partial(doc, out_path)
    doc["load_after"] = [round(x, 2) for x in os.getloadavg()]
    expected_ratios(doc, {m: load_config(resolve_model_dir(m)).hidden_size for m in model_list})
    doc["goal"] = {"target": GOAL, **goal_check(doc["runs"])}
    table = markdown_table(doc)
    click.echo(table, err=True)
    if out_path is not None:
        out_path.with_suffix(".md").write_text(table + "\n")
        out_path.with_suffix(".partial.json").unlink(missing_ok=True)
    _emit(doc, str(out_path) if out_path is not None else "-")


def _direct(cfg, run_dir: Path, key_prefix: str, phase_args: dict, relayed: dict) -> dict:
    """The same federation over the bare veth links (no relay), two loopback phases: its samples/s
    beside the relayed run's loopback phases (two runs, so the machine's load differs too)."""
    echo(f"{cfg.model}, {cfg.mode}, {cfg.silos} silo(s): without relays (direct veth), for the relay's cost")
    plain = run_phases(cfg, run_dir, key_prefix, [LOOPBACK, LOOPBACK], relay=False, micro_batches=1, **phase_args)
    direct = ratios(plain["phases"])["loopback_samples_per_s"]
    via = relayed["vs_loopback"]["loopback_samples_per_s"]
    echo(f"  -> direct {direct} samples/s, through the relay at 0 ms {via}")
    return {"model": cfg.model, "mode": cfg.mode, "silos": cfg.silos, "direct_samples_per_s": direct,
            "relay_0ms_samples_per_s": via, "relay_vs_direct": round(via / direct, 3) if direct else None}
