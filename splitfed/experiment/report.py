"""The experiment's outputs: the metric table (Markdown), the report, and one PNG.

The PNG has the loss curves side by side (split-fed: every silo's steps in the order the trunk
applied them; centralized: its steps; the same x axis, updates of the same batch size) and the
metric table under them. matplotlib is imported here only.
"""

from __future__ import annotations

from pathlib import Path

COLUMNS = [("accuracy", "accuracy %"), ("macro_f1", "macro-F1 %"), ("exact_match", "exact match %"),
           ("rouge_l", "ROUGE-L %"), ("perplexity", "perplexity")]


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, metrics in result["table"]:
        rows.append([name] + [_fmt(metrics.get(key), key) for key, _ in COLUMNS])
    return rows


def _fmt(value, key: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if key == "perplexity" else f"{value:.1f}"


def markdown_table(result: dict) -> str:
    header = ["model"] + [label for _, label in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    return "\n".join(lines)


def markdown_report(result: dict, png_name: str) -> str:
    p, v = result["preset"], result["verdict"]
    data = result["data"]
    counts = "; ".join(f"silo{i}: " + ", ".join(f"{k} {n}" for k, n in c.items())
                       for i, c in enumerate(data["silo_label_counts"]))
    return f"""# BBC News: split-federated vs centralized fine-tuning of SmolLM2-135M

Command: `{result['command']}`

* preset **{p['name']}**: {p['silos']} silos x {p['steps']} steps (K={p['local_steps']}), batch {p['batch_size']},
  LoRA r={p['lora_r']} alpha={p['lora_alpha']}, lr {p['lr']}, max length {p['max_length']} tokens,
  articles cut to {p['max_chars']} characters; centralized: {p['silos'] * p['steps']} steps on the union.
* partition **{result['partition']}**{f" (Dirichlet alpha {result['alpha']})" if result['partition'] != 'iid' else ''}:
  {data['train']} training articles ({counts}); {data['heldout']} held-out articles, balanced over the 5 topics.
* split-fed: serial mode, broker + trunk worker + {p['silos']} silo agents as processes, sealed end to end,
  wire dtype {p.get('wire_dtype', 'fp32')}, seed {p['seed']};
  each silo's model = its head/tail adapters (secure FedAvg over the silos at every round's end) + the shared trunk adapter.
* evaluation: greedy split generation (KV caches), {p['max_new_tokens']} new tokens; the label is the topic
  that starts a word earliest in the generated text (case-insensitive); perplexity on the first {p['perplexity_examples']} held-out
  completions.

{markdown_table(result)}

Split-fed (mean over silos) accuracy {v['split_accuracy']:.1f} vs centralized {v['centralized_accuracy']:.1f}:
difference {v['accuracy_gap']:+.1f} points; zero-shot {v['zero_shot_accuracy']:.1f}.
Within 1.0 point: **{'yes' if v['within_one_point'] else 'no'}**; both above zero-shot by >= 10 points:
**{'yes' if v['both_clearly_above_zero_shot'] else 'no'}**. Paired on the same articles (only centralized
right / only split-fed right): {'; '.join(f"{n.removeprefix('split-fed ')} {d['only_centralized_right']}/{d['only_split_right']}"
                                         for n, d in v.get('disagreements', {}).items())}.

Wall time {result['timing']['total_s']:.0f} s (federation {result['timing']['federated_s']:.0f} s, centralized
{result['timing']['centralized_s']:.0f} s, evaluation {result['timing']['eval_s']:.0f} s); load average at start
{result['load_start']}, at end {result['load_end']} on {result['cpus']} CPUs.

![loss curves and metrics]({png_name})
"""


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.3])
    left, right = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1], sharey=None)
    rows = result["split_losses"]
    for silo in sorted({r["silo"] for r in rows}):
        pts = [(i + 1, r["loss"]) for i, r in enumerate(rows) if r["silo"] == silo]
        left.plot(*zip(*pts), marker=".", linewidth=1, label=silo)
    left.set_title(f"split-fed ({len({r['silo'] for r in rows})} silos, serial)")
    central = result["centralized_losses"]
    right.plot(range(1, len(central) + 1), central, marker=".", linewidth=1, color="black", label="centralized")
    right.set_title("centralized (union of the silos' data)")
    top = max(max(r["loss"] for r in rows), max(central)) * 1.05
    for ax in (left, right):
        ax.set_xlabel("update (trunk update / step, batch %d)" % result["preset"]["batch_size"])
        ax.set_ylabel("training loss")
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
        ax.legend()
    table_ax = fig.add_subplot(grid[1, :])
    table_ax.axis("off")
    table = table_ax.table(cellText=table_rows(result), colLabels=["model"] + [c for _, c in COLUMNS],
                           loc="center", cellLoc="center")
    table.scale(1, 1.3)
    fig.suptitle(f"BBC News, SmolLM2-135M + LoRA, preset {result['preset']['name']}, {result['partition']} partition")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
