"""`splitfed plot RUN_JSON --out loss.png`: training loss per silo against its step.

Input: the JSON of `splitfed demo --json` (``losses`` with the matching ``schedule`` of
``[silo, step]`` pairs, ``centralized_losses`` when run with ``--check-centralized``), or a silo's
own ``--results`` file (``steps``: ``[{"step", "loss"}, ...]``). The centralized reference is drawn
dashed over each silo's line: where split training equals centralized training (it should, exactly)
the dashes sit on the solid line.

matplotlib is an optional dependency (``pip install 'splitfed[plot]'``), imported only here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click


class RunFileError(ValueError):
    pass


def curves(doc: dict[str, Any]) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """Per silo, ``[(step, loss), ...]`` in step order, for the run and for the centralized reference."""
    if "losses" not in doc and isinstance(doc.get("steps"), list):  # a silo agent's --results file
        silo = str(doc.get("silo_id", "silo"))
        try:
            return {silo: sorted((int(h["step"]), float(h["loss"])) for h in doc["steps"])}, {}
        except (KeyError, TypeError, ValueError) as exc:
            raise RunFileError(f"bad entry in 'steps': {exc}") from None
    losses, schedule = doc.get("losses"), doc.get("schedule")
    if not isinstance(losses, list) or not isinstance(schedule, list):
        raise RunFileError("expected 'losses' and 'schedule' lists (the JSON of `splitfed demo --json`)")
    if len(losses) != len(schedule):
        raise RunFileError(f"'losses' has {len(losses)} entries but 'schedule' has {len(schedule)}")
    reference = doc.get("centralized_losses")
    if reference is not None and (not isinstance(reference, list) or len(reference) != len(losses)):
        raise RunFileError("'centralized_losses' must be a list as long as 'losses'")
    run: dict[str, list[tuple[int, float]]] = {}
    ref: dict[str, list[tuple[int, float]]] = {}
    for i, entry in enumerate(schedule):
        try:
            silo, step = str(entry[0]), int(entry[1])
            run.setdefault(silo, []).append((step, float(losses[i])))
            if reference is not None:
                ref.setdefault(silo, []).append((step, float(reference[i])))
        except (TypeError, ValueError, IndexError) as exc:
            raise RunFileError(f"bad schedule/loss entry {i}: {exc}") from None
    for d in (run, ref):
        for points in d.values():
            points.sort()
    return run, ref


def _silo_order(name: str) -> tuple:
    digits = name.lstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-.")
    return (0, int(digits), name) if digits.isdigit() else (1, 0, name)


def _title(doc: dict[str, Any], n_silos: int) -> str:
    parts = [f"splitfed {doc['mode']}" if doc.get("mode") else "splitfed"]
    parts.append(f"{n_silos} silo{'s' if n_silos != 1 else ''}")
    parts += [f"{k} {doc[k]}" for k in ("model", "adapter") if doc.get(k)]
    if doc.get("run_id"):
        parts.append(f"run {doc['run_id']}")
    return ", ".join(parts)


def plot_losses(doc: dict[str, Any], out: Path, title: str | None = None, dpi: int = 120) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException(
            "splitfed plot needs matplotlib: pip install 'splitfed[plot]' (or pip install matplotlib)") from None
    run, ref = curves(doc)
    if not run:
        raise RunFileError("no losses to plot")
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=dpi)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, silo in enumerate(sorted(run, key=_silo_order)):
        color = colors[i % len(colors)]
        steps, losses = zip(*run[silo])
        ax.plot(steps, losses, color=color, linewidth=2.2, alpha=0.75, marker="o", markersize=3, label=silo)
        if silo in ref:
            rs, rl = zip(*ref[silo])
            ax.plot(rs, rl, color="black", linewidth=1.0, linestyle=(0, (4, 3)),
                    label="centralized reference" if i == 0 else None)
    ax.set_xlabel("silo step")
    ax.set_ylabel("training loss")
    subtitle = ""
    diff = doc.get("max_abs_loss_diff")
    if isinstance(diff, (int, float)) and math.isfinite(diff):
        subtitle = f"\nmax |loss - centralized| = {diff:.2e}"
    ax.set_title((title or _title(doc, len(run))) + subtitle, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: labels[k] == "centralized reference")  # reference last
    ax.legend([handles[k] for k in order], [labels[k] for k in order], loc="upper right", fontsize=9,
              ncol=2 if len(run) > 6 else 1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


@click.command("plot")
@click.argument("run_json", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", "out", type=click.Path(path_type=Path, dir_okay=False),
              help="image file (.png, .svg, .pdf; default: RUN_JSON with .png)")
@click.option("--title", default=None, help="replace the automatic title")
@click.option("--dpi", type=click.IntRange(50, 600), default=120, show_default=True)
def plot(run_json: Path, out: Path | None, title: str | None, dpi: int) -> None:
    """Plot loss per silo against its step from RUN_JSON (`splitfed demo --json`), with the
    centralized reference dashed when the run has one (`--check-centralized`)."""
    try:
        doc = json.loads(run_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"{run_json}: not a readable JSON file: {exc}") from None
    if not isinstance(doc, dict):
        raise click.ClickException(f"{run_json}: expected a JSON object")
    out = out or run_json.with_suffix(".png")
    try:
        plot_losses(doc, out, title, dpi)
    except RunFileError as exc:
        raise click.ClickException(f"{run_json}: {exc}") from None
    click.echo(f"wrote {out}")

