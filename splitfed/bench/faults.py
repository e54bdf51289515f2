"""`splitfed bench faults`: how long the run takes to recover from each kind of crash.

For each fault kind a `splitfed demo --kill ROLE@STEP` runs beside a fault-free run of the same
configuration (tiny model by default). Per kind it reports the recovery time (from the SIGKILL
to the moment every silo is past the newest step at the kill: restart, re-registration,
rollback to the last committed round and replay), the extra wall time of the whole demo
against the fault-free run, and whether losses and schedule equal the fault-free run's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from splitfed.bench.modes import run_demo

KINDS = ("trunk", "broker", "silo1", "redis")


@click.command("faults")
@click.option("--model", default="tiny", show_default=True)
@click.option("--steps", type=click.IntRange(4), default=20, show_default=True, help="steps per silo")
@click.option("--local-steps", type=click.IntRange(1), default=10, show_default=True)
@click.option("--at", "at_step", type=click.IntRange(1), default=7, show_default=True, help="step of each kill")
@click.option("--kinds", default=",".join(KINDS), show_default=True, help="comma-separated roles to kill")
@click.option("--json", "json_path", default="-", show_default=True, help="output file ('-' = stdout)")
def faults(model: str, steps: int, local_steps: int, at_step: int, kinds: str, json_path: str) -> None:
    """Recovery time per fault kind (SIGKILL + restart), beside a fault-free run."""
    from splitfed.bench.command import _emit

    roles = [k for k in kinds.split(",") if k]
    if not roles or any(r not in KINDS for r in roles):
        raise click.BadParameter(f"roles among {', '.join(KINDS)}", param_hint="--kinds")
    if at_step >= steps:
        raise click.BadParameter(f"--at {at_step} must be below --steps {steps}", param_hint="--at")
    args = ["--model", model, "--silos", "2", "--steps", str(steps), "--local-steps", str(local_steps)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-faults-") as tmp:
        click.echo("[bench faults] fault-free run...", err=True)
        base = run_demo(args, Path(tmp), "fault-free")
        for role in roles:
            click.echo(f"[bench faults] --kill {role}@{at_step}...", err=True)
            run = run_demo([*args, "--kill", f"{role}@{at_step}"], Path(tmp), role)
            (fault,) = run["faults"]
            rows.append({
                "kind": role, "killed_at_step": fault["killed_step"], "recovery_s": fault.get("recovery_s"),
                "extra_wall_s": round(run["wall_s"] - base["wall_s"], 3),  # whole demo, start-up included
                "same_losses": max(abs(a - b) for a, b in zip(run["losses"], base["losses"])) <= 1e-6,
                "same_schedule": run["schedule"] == base["schedule"],
            })
            click.echo(f"[bench faults] {role}: recovered in {rows[-1]['recovery_s']} s", err=True)
    _emit({"bench": "faults", "model": model, "steps": steps, "local_steps": local_steps,
           "fault_free_wall_s": base["wall_s"], "faults": rows}, json_path)
