"""The audit's report: the JSON document, a Markdown table like FL-GLM's Table 3, a PNG curve.

Table rows are cuts and defenses; columns are token recovery / BLEU-4 / ROUGE-L for each attack,
then the utility cost (held-out loss and topic accuracy after the same short fine-tune). The PNG
plots each attack's token recovery against the held-out loss over the defense settings: the
privacy/utility trade-off, with the 5% line the issue asks a defense to reach.

matplotlib is an optional dependency (``pip install 'splitfed[plot]'``), imported only for the PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

from splitfed.audit.runner import ATTACKS

ATTACK_TITLES = {"learned": "learned (a)", "optimization": "optimization (b)", "nearest": "nearest embedding (c)"}
FILES = ("invert.json", "invert.md", "invert.png")


def _utility_cells(row: dict, baseline: dict | None) -> list[str]:
    u = row.get("utility")
    if not u:
        return ["n/a", "n/a"]
    loss = f"{u['eval_loss']:.3f}"
    if baseline and row["defense"]["clip_norm"] is not None:
        loss += f" ({u['eval_loss'] - baseline['eval_loss']:+.3f})"
    return [loss, f"{u['eval_accuracy']:.1f}"]


def markdown(doc: dict) -> str:
    cfg = doc["config"]
    head = ["Cut / defense"]
    for name in ATTACKS:
        head += [f"{ATTACK_TITLES[name]}: token rec. %", "BLEU-4", "ROUGE-L"]
    head += ["held-out loss (vs none)", "topic acc. %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in doc["rows"]:
        cells = [row["label"]]
        for name in ATTACKS:
            s = row["attacks"][name]
            cells += [f"{s['token_recovery']:.1f}", f"{s['bleu4']:.1f}", f"{s['rouge_l']:.1f}"]
        cells += _utility_cells(row, doc.get("utility_baseline"))
        lines.append("| " + " | ".join(cells) + " |")
    base = doc.get("utility_baseline")
    notes = [
        f"Model {doc['model']} ({doc['num_layers']} layers, hidden {doc['hidden_size']}); "
        f"{doc['victims']['texts']} private texts of {doc['victims']['max_tokens']} tokens "
        f"({doc['victims']['tokens']} tokens, topics {', '.join(doc['victims']['topics'])}); the attacker's shadow "
        f"text: {doc['shadow']['windows']} windows of the other topics "
        f"(covers {doc['shadow']['victim_token_coverage']:.1f}% of the victim tokens).",
        f"Clip norm {doc['clip_norm']:.3g} ({doc['clip_norm_source']}); noise = sigma per coordinate "
        f"(noise norm / clip norm: " + ", ".join(f"{r['noise_ratio']:.3g}" for r in doc["rows"] if r["noise_ratio"])
        + "). Pads are zeroed by every defense.",
        f"Budgets: learned attacker {cfg['learned_steps']} steps, optimization {cfg['optim_steps']} steps; "
        f"fine-tune {cfg['finetune']['steps']} LoRA steps of batch {cfg['finetune']['batch_size']}, "
        f"{cfg['finetune']['eval_examples']} held-out articles.",
        f"Guessing the most frequent shadow token everywhere recovers {doc['prior_baseline_recovery']:.1f}% of tokens.",
    ]
    if base:
        notes.append(f"Undefended fine-tune: held-out loss {base['eval_loss']:.3f}, topic accuracy "
                     f"{base['eval_accuracy']:.1f}%.")
    notes.append(f"Wall time {doc['wall_s']:.0f} s on {doc['torch_threads']} torch threads.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def plot(doc: dict, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the PNG needs matplotlib: pip install 'splitfed[plot]'") from None
    points = [r for r in doc["rows"] if r.get("utility") and r["cut"] == doc["config"]["defense_cut"]]
    points.sort(key=lambda r: r["noise_ratio"] + (0 if r["defense"]["clip_norm"] is None else 1e-9))
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name in ATTACKS:
        xs = [r["utility"]["eval_loss"] for r in points]
        ys = [r["attacks"][name]["token_recovery"] for r in points]
        ax.plot(xs, ys, marker="o", linewidth=1.8, label=ATTACK_TITLES[name])
    tags: dict[tuple[float, float], list[str]] = {}  # points that coincide share one label
    for r in points:
        tag = "none" if r["defense"]["clip_norm"] is None else (
            "clip" if not r["noise_ratio"] else f"noise x{r['noise_ratio']:.3g}")
        best = max(r["attacks"][n]["token_recovery"] for n in ATTACKS)
        tags.setdefault((round(r["utility"]["eval_loss"], 2), round(best)), []).append(tag)
    for i, ((x, y), names) in enumerate(tags.items()):  # alternate above/below: neighbours do not collide
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 6 if i % 2 == 0 else -13),
                    fontsize=8)
    ax.axhline(5.0, color="black", linestyle=(0, (4, 3)), linewidth=1.0, label="5% token recovery")
    ax.axhline(doc["prior_baseline_recovery"], color="grey", linestyle=":", linewidth=1.0,
               label="most-frequent-token guess")
    ax.set_xlabel("held-out loss after the same fine-tune (utility cost: to the right is worse)\n"
                  "labels: noise norm as a multiple of the clip norm")
    ax.set_ylabel("token recovery of the private text (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{doc['model']}: privacy vs utility at a cut of {doc['config']['defense_cut']} head block(s)",
                 fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(doc: dict, out_dir: Path) -> list[Path]:
    """invert.json, invert.md and invert.png in ``out_dir``; the PNG only where there is a curve."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f for f in FILES)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(markdown(doc))
    written = [json_path, md_path]
    if any(r.get("utility") for r in doc["rows"]):
        written.append(plot(doc, png_path))
    return written
