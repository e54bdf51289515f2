"""`audit defend`'s report: defend.json, a Markdown table, and the privacy/utility PNG.

The table's headline column is the STRONGEST attack's token recovery (the max over the attacks),
beside BBC topic accuracy and its change against the undefended fine-tune at the same budget.
The PNG puts every defense on one plane: topic accuracy (x) against the strongest attack's token
recovery (y), one series per kind (noise, learned adapter, bottleneck, deeper heads), with the issue's
target region.
"""

from __future__ import annotations

import json
from pathlib import Path

TITLES = {"retrained": "retrained (a')", "public": "public-weights (a)", "optimization": "optimization (b)",
          "nearest": "nearest (c)"}
FILES = ("defend.json", "defend.md", "defend.png")
TARGET_RECOVERY, TARGET_ACCURACY_DROP = 10.0, 3.0  # issue 19's goal
LEARNED = ("learned", "bottleneck")  # the row kinds trained against the silo's own inverter


def _baseline(doc: dict) -> dict | None:
    for row in doc["rows"]:
        if row["kind"] == "none":
            return row
    return None


def _label_blocks(k: int) -> str:
    return f"{k} block{'s' if k > 1 else ''}"


def markdown(doc: dict) -> str:
    base = _baseline(doc)
    head = ["Cut / defense", *[f"{TITLES[n]} tok. rec. %" for n in TITLES], "strongest tok. rec. %",
            "BLEU-4 (a')", "BBC acc. % (vs none)", "held-out loss", "fine-tune s/step",
            "silo inverter loss first → last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in doc["rows"]:
        a = row["attacks"]
        acc = row["utility"]["eval_accuracy"]
        acc_cell = f"{acc:.1f}" + (f" ({acc - base['utility']['eval_accuracy']:+.1f})" if base else "")
        inv = row.get("silo_inverter_loss")
        cells = [row["label"], *[f"{a[n]['token_recovery']:.1f}" if n in a else "—" for n in TITLES],
                 f"**{row['strongest']:.1f}**", f"{a['retrained']['bleu4']:.1f}", acc_cell,
                 f"{row['utility']['eval_loss']:.3f}", f"{row['finetune_s_per_step']:.1f}",
                 f"{inv[0]:.2f} → {inv[-1]:.2f}" if inv else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    cfg = doc["config"]
    ft = cfg["finetune"]
    notes = [
        f"Model {doc['model']} ({doc['num_layers']} layers, hidden {doc['hidden_size']}); {cfg['victims']} private "
        f"texts of {cfg['max_tokens']} tokens ({doc['victim_tokens']} tokens); attackers train on {cfg['shadow']} "
        "shadow windows of the other BBC topics.",
        "Attacker (a') knows the silo's trained head (base + LoRA + privacy adapter or bottleneck D, U), the cut, "
        "clip norm and sigma; "
        "not the noise draws, not the silo's inverter. (a) knows only the public base head and the clip/noise "
        "settings (run only for learned rows; elsewhere the trained head differs from the public one by LoRA alone).",
        "Clip norms (median shadow-token norm at the cut): "
        + ", ".join(f"cut {k}: {v:.3g}" for k, v in doc["clip_norms"].items())
        + ". Learned defense: " + (_learned_settings(doc) or "no row") + ".",
        f"Budgets: fine-tune {ft['steps']} LoRA steps of batch {ft['batch_size']} (max {ft['max_length']} tokens), "
        f"{ft['eval_examples']} held-out articles (one article = {100 / ft['eval_examples']:.1f} accuracy points); "
        f"attackers {cfg['learned_steps']} steps, optimization {cfg['optim_steps']} steps.",
        f"Goal of issue 19: strongest token recovery <= {TARGET_RECOVERY:.0f}% with accuracy within "
        f"{TARGET_ACCURACY_DROP:.0f} points of undefended. Reached by: "
        + (", ".join(r["label"] for r in reached(doc)) or "no row") + ".",
        f"Wall time {doc.get('wall_s', 0):.0f} s on {doc['torch_threads']} torch threads"
        + (f", summed over {len(doc['runs'])} runs made side by side; fine-tune s/step compares only rows of one "
           "run (the load differed between runs)." if "runs" in doc else "."),
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _learned_settings(doc: dict) -> str:
    """The learned rows' settings, once per distinct setting (merged runs may differ)."""
    seen = []
    for row in doc["rows"]:
        if row["kind"] in LEARNED:
            c = row.get("run_config") or doc["config"]
            what = (f"adapter rank {c['rank']}, adapter" if row["kind"] == "learned" else
                    "rank-k bottleneck (k in the label; starts at the top-k principal directions of h1), its")
            text = (f"{what} lr {c['adapter_lr']:.3g}, {c['warmup_steps']} warm-up steps "
                    f"(distortion weight {c['distortion']:.3g}), {c['inverter_steps']} silo-inverter updates per step "
                    f"(lr {c['inverter_lr']:.3g}), noise after it sigma {row['sigma']:.3g}")
            if text not in seen:
                seen.append(text)
    return "; ".join(seen)


def reached(doc: dict) -> list[dict]:
    """Rows meeting the goal (strongest recovery and accuracy drop both within bounds)."""
    base = _baseline(doc)
    if base is None:
        return []
    floor = base["utility"]["eval_accuracy"] - TARGET_ACCURACY_DROP
    return [r for r in doc["rows"] if r["kind"] != "none" and r["strongest"] <= TARGET_RECOVERY
            and r["utility"]["eval_accuracy"] >= floor]


def _tag(row: dict) -> str:
    if row["kind"] == "none":
        return _label_blocks(row["cut"])
    if row["kind"] == "noise":
        return f"σ {row['sigma']:.3g}"
    c = row.get("run_config") or {}
    tag = f"λ {row['strength']:.3g}" + (f"/d {c['distortion']:.3g}" if "distortion" in c else "")
    return f"k {row['bottleneck']} {tag}" if row["kind"] == "bottleneck" else tag


def plot(doc: dict, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the PNG needs matplotlib: pip install 'splitfed[plot]'") from None
    base = _baseline(doc)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    # one curve per kind (the learned defense: per cut; a curve starts at "no defense" of its cut)
    series = [("noise", None, "clip + noise (today)", "o"), ("none", None, "no defense, deeper heads", "^")]
    for k in sorted({r["cut"] for r in doc["rows"] if r["kind"] == "bottleneck"}):
        series.insert(1, ("bottleneck", k, f"learned rank-k bottleneck, {_label_blocks(k)}", "D"))
    for k in sorted({r["cut"] for r in doc["rows"] if r["kind"] == "learned"}):
        series.insert(1, ("learned", k, f"learned privacy adapter, {_label_blocks(k)}", "s"))
    for kind, cut, title, marker in series:
        pts = [r for r in doc["rows"] if r["kind"] == kind and (cut is None or r["cut"] == cut)]
        start = next((r for r in doc["rows"] if r["kind"] == "none" and r["cut"] == (cut or 1)), None)
        if kind != "none" and start is not None:
            pts = [start, *pts]
        pts.sort(key=lambda r: -r["utility"]["eval_accuracy"])
        if not pts:
            continue
        ax.plot([r["utility"]["eval_accuracy"] for r in pts], [r["strongest"] for r in pts], marker=marker,
                linewidth=1.5, label=title)
        for r in pts:
            if r["kind"] == kind:  # short tags: the table has the full labels
                ax.annotate(_tag(r), (r["utility"]["eval_accuracy"], r["strongest"]), textcoords="offset points",
                            xytext=(3, -10 if kind in LEARNED else 4), fontsize=7)
    if base is not None:
        x0 = base["utility"]["eval_accuracy"] - TARGET_ACCURACY_DROP
        ax.fill_between([x0, 100], 0, TARGET_RECOVERY, color="green", alpha=0.12, label="issue 19 goal")
    ax.set_xlabel("BBC topic accuracy after the same fine-tune (%)  (to the right is better)")
    ax.set_ylabel("strongest attack's token recovery (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_title(f"{doc['model']}: privacy vs utility against a retrained attacker", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def merge(docs: list[dict]) -> dict:
    """One report from several `audit defend` runs of the same model and texts (e.g. run side by side
    on a busy machine): the first run's settings, every run's rows, each row keeping its own settings."""
    if not docs:
        raise ValueError("nothing to merge")
    first = docs[0]
    keys = ("model", "victims", "max_tokens", "shadow", "finetune", "seed", "learned_steps", "optim_steps")
    for doc in docs[1:]:
        if doc["model"] != first["model"] or any(doc["config"][k] != first["config"][k] for k in keys):
            raise ValueError(f"runs differ in model, texts or budgets ({', '.join(keys)}): not comparable")
    out = dict(first, rows=[], clip_norms={}, runs=[])
    for doc in docs:
        out["clip_norms"].update(doc["clip_norms"])
        out["runs"].append({"config": doc["config"], "wall_s": doc.get("wall_s"), "rows": len(doc["rows"])})
        out["rows"] += [dict(r, run_config={k: doc["config"][k] for k in ("rank", "inverter_steps", "inverter_lr",
                                                                          "adapter_lr", "warmup_steps", "distortion")})
                        for r in doc["rows"]]
    # runs that differ in the learned settings would give rows of one label: name the setting that differs
    learned = [r for r in out["rows"] if r["kind"] in LEARNED]
    for key, name in (("distortion", "distortion"), ("adapter_lr", "adapter lr"), ("warmup_steps", "warm-up"),
                      ("rank", "rank")):
        if len({r["run_config"][key] for r in learned}) > 1:
            for r in learned:
                r["label"] += f", {name} {r['run_config'][key]:.3g}"
    out["wall_s"] = sum(d.get("wall_s") or 0 for d in docs)
    return out


def write_report(doc: dict, out_dir: Path, with_png: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f for f in FILES)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(markdown(doc))
    written = [json_path, md_path]
    if with_png and doc["rows"]:
        written.append(plot(doc, png_path))
    return written
