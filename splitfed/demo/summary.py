"""The demo's closing table: per silo, how the loss moved; then the centralized comparison."""

from __future__ import annotations

import click


def print_summary(result: dict, rows: list[dict]) -> None:
    silos = sorted({r["silo"] for r in rows}, key=lambda s: int(s.removeprefix("silo")) if s[4:].isdigit() else s)
    header = f"{'silo':<8}{'steps':>6}{'first loss':>12}{'last loss':>12}{'mean last 5':>13}"
    lines = ["", header, "-" * len(header)]
    for sid in silos:
        losses = [r["loss"] for r in rows if r["silo"] == sid]
        tail = losses[-5:]
        lines.append(f"{sid:<8}{len(losses):>6}{losses[0]:>12.4f}{losses[-1]:>12.4f}{sum(tail) / len(tail):>13.4f}")
    lines.append("-" * len(header))
    updates = len({r["trunk_seq"] for r in rows}) if result["mode"] == "client-batch" else len(rows)
    lines.append(f"mode {result['mode']}: {len(rows)} silo steps in {updates} trunk updates, "
                 f"{result['train_wall_s']:.1f}s training ({len(rows) / max(result['train_wall_s'], 1e-9):.2f} silo steps/s), "
                 f"{result['wall_s']:.1f}s with start-up")
    security = "sealed end to end, rekeyed every round" if result.get("encryption") else "NOT encrypted"
    if result.get("curve"):
        security += ", CurveZMQ on every socket"
    rejected = sum(result.get("rejected_frames", {}).values())
    lines.append(f"wire: {security}; {rejected} frames rejected")
    if "max_abs_loss_diff" in result:
        diff = result["max_abs_loss_diff"]
        weight = result.get("max_abs_weight_diff")
        verdict = "MATCH" if diff <= 1e-5 and (weight is None or weight <= 1e-5) else "DIFFERS"  # NaN differs
        weights = "" if weight is None else (f", final weights max |diff| = {weight:.3e} over "
                                             f"{result.get('weight_tensors_compared', 0)} tensors")
        lines.append(f"centralized reference: max |loss diff| = {diff:.3e} over {len(rows)} steps{weights} "
                     f"-> {verdict} (tolerance 1e-5)")
    click.echo("\n".join(lines))
