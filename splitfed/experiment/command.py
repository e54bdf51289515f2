"""`splitfed experiment bbc`: split-fed against centralized fine-tuning on BBC News, and zero-shot.

Top to bottom: build the held-out split and the silos' data; train split-fed (real processes);
train centralized on the union with the same hyper-parameters and budget; evaluate zero-shot,
centralized and every silo's split-fed model on the same held-out articles; write JSON, a
Markdown report and a PNG into --out.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import click
from transformers.utils import logging as hf_logging

from shared.model.adapter_files import adapter_metadata, load_split_adapters, save_adapter_file
from splitfed.experiment.bbc import TOPICS
from shared.data.dataset import Example, load_jsonl
from splitfed.evaluation.evaluation import evaluate, perplexity
from shared.model.generation import Sampling
from shared.model.models import resolve_model_dir
from shared.data.tokenizer import load_tokenizer
from splitfed.evaluation.trained_parts import load_split_model
from splitfed.experiment.bbc_data import PARTITIONS, build_task
from splitfed.experiment.centralized_arm import lora_config, train_centralized
from splitfed.experiment.federated_arm import run_federation
from splitfed.experiment.presets import PRESETS, Preset
from shared.wire.compression import WIRE_FORMATS
from splitfed.experiment.split_only import identical_adapter_files, write_result
from splitfed.experiment.report import markdown_report, markdown_table, plot

CLEARLY_ABOVE_POINTS = 10.0


@click.group("experiment")
def experiment() -> None:
    """Experiments on real models and data."""


@experiment.command("bbc")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="fast", show_default=True,
              help="fast: <= 15 min on a 2-core CPU; full: for a GPU")
@click.option("--partition", type=click.Choice(PARTITIONS), default="iid", show_default=True,
              help="iid, or label-skew: each topic spread over the silos by Dirichlet(alpha) shares")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Dirichlet concentration of --partition label-skew (small: more skewed)")
@click.option("--silos", type=click.IntRange(1, 16), help="override the preset's number of silos")
@click.option("--steps", type=click.IntRange(1), help="override the preset's steps per silo")
@click.option("--train-per-topic", type=click.IntRange(1), help="override the preset's training articles per topic")
@click.option("--eval-per-topic", type=click.IntRange(1), help="override the preset's held-out articles per topic")
@click.option("--seed", type=click.IntRange(0), help="override the preset's seed (adapter init, data order, held-out split)")
@click.option("--wire-dtype", type=click.Choice(WIRE_FORMATS),
              help="override the split-fed arm's wire format (int8, fp8-*: compressed activations and gradients)")
@click.option("--split-only", is_flag=True,
              help="only the split-fed arm (no centralized, no zero-shot): to compare split-fed runs, e.g. wire formats")
@click.option("--model", default="smollm2", show_default=True, help="'smollm2', 'tiny' or a model directory")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/bbc"), show_default=True,
              help="directory for data, logs, weights and the report")
@click.option("--key-prefix", default="splitfed", show_default=True, envvar="SPLITFED_KEY_PREFIX",
              help="namespace of the federation's Redis keys [env SPLITFED_KEY_PREFIX]")
def bbc(preset: str, partition: str, alpha: float, silos: int | None, steps: int | None,
        train_per_topic: int | None, eval_per_topic: int | None, seed: int | None, wire_dtype: str | None, split_only: bool,
        model: str, out_dir: Path, key_prefix: str) -> None:
    """Fine-tune split-fed and centralized on BBC News; evaluate both and zero-shot; write a report."""
    p = PRESETS[preset].with_overrides(silos=silos, steps=steps, train_per_topic=train_per_topic,
                                       eval_per_topic=eval_per_topic, seed=seed, wire_dtype=wire_dtype)
    command = "splitfed " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["experiment"] \
        else f"splitfed experiment bbc --preset {preset} --partition {partition}"
    started, load_start = time.perf_counter(), _load()
    hf_logging.disable_progress_bar()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = resolve_model_dir(model)
        task = build_task(p, partition, alpha, out_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _say(f"data: {len(task.train)} training articles over {p.silos} silos ({partition}), {len(task.heldout)} held out")

    _say(f"split-fed: {p.silos} silos x {p.steps} steps through broker + trunk worker processes ...")
    fed = run_federation(p, model, task.silo_paths, out_dir / "federation", key_prefix)
    _say(f"split-fed done in {fed.wall_s:.0f} s")
    if split_only:
        return _split_only(p, partition, command, task, fed, model_dir, out_dir)

    _say(f"centralized: {p.silos * p.steps} steps on the union ...")
    central_losses, central_state, central_s = train_centralized(
        model_dir, p, task.union_path, progress=lambda s, n, loss: _say(f"  step {s}/{n} loss {loss:.4f}") if s % 10 == 0 else None)

    # the centralized adapter too, in the same format: `splitfed eval` and comparisons can reuse it
    save_adapter_file(out_dir / "centralized" / "adapter.safetensors", central_state,
                      adapter_metadata(lora_config(p), "centralized"))
    eval_started = time.perf_counter()
    heldout = load_jsonl(task.heldout_path)
    tokenizer = load_tokenizer(model_dir)
    cfg = lora_config(p)
    metrics = {"zero-shot": _evaluate(load_split_model(model_dir), tokenizer, heldout, p, "zero-shot")}
    metrics["centralized"] = _evaluate(load_split_model(model_dir, cfg, central_state), tokenizer, heldout, p, "centralized")
    for silo in (f"silo{i}" for i in range(p.silos)):
        state = load_split_adapters(fed.silo_file(silo), fed.trunk_file, cfg)
        metrics[f"split-fed {silo}"] = _evaluate(load_split_model(model_dir, cfg, state), tokenizer, heldout, p,
                                                 f"split-fed {silo}")
    eval_s = time.perf_counter() - eval_started

    result = _result(p, partition, alpha, command, task, fed, central_losses, metrics, load_start)
    result["timing"] = {"federated_s": round(fed.wall_s, 1), "centralized_s": round(central_s, 1),
                        "eval_s": round(eval_s, 1), "total_s": round(time.perf_counter() - started, 1)}
    result["load_end"] = _load()
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    plot(result, out_dir / "report.png")
    (out_dir / "report.md").write_text(markdown_report(result, "report.png"))
    click.echo(markdown_table(result))
    v = result["verdict"]
    click.echo(f"\nsplit-fed {v['split_accuracy']:.1f} vs centralized {v['centralized_accuracy']:.1f} "
               f"({v['accuracy_gap']:+.1f} points), zero-shot {v['zero_shot_accuracy']:.1f}; "
               f"{result['timing']['total_s']:.0f} s; report in {out_dir / 'report.md'}")


def _split_only(p: Preset, partition: str, command: str, task, fed, model_dir: Path, out_dir: Path) -> None:
    eval_started = time.perf_counter()
    heldout, tokenizer, cfg = load_jsonl(task.heldout_path), load_tokenizer(model_dir), lora_config(p)
    silos = [f"silo{i}" for i in range(p.silos)]
    once = identical_adapter_files([fed.silo_file(s) for s in silos])
    metrics = {}
    for silo in silos[:1] if once else silos:
        state = load_split_adapters(fed.silo_file(silo), fed.trunk_file, cfg)
        metrics[f"split-fed {silo}"] = _evaluate(load_split_model(model_dir, cfg, state), tokenizer, heldout, p,
                                                 f"split-fed {silo}" + (" (= every silo: identical adapters)" if once else ""))
    timing = {"federated_s": round(fed.wall_s, 1), "eval_s": round(time.perf_counter() - eval_started, 1)}
    result = write_result(out_dir, command, p.to_dict(), partition, task.summary(), fed.run_id, fed.rows, metrics,
                          once, timing)
    m = result["split_mean"]
    click.echo(f"split-fed (wire {p.wire_dtype}, seed {p.seed}): accuracy {m['accuracy']:.1f}, macro-F1 "
               f"{m['macro_f1']:.1f}, perplexity {m['perplexity']:.3f}; result in {out_dir / 'result.json'}")


def _evaluate(model, tokenizer, heldout: list[Example], p: Preset, name: str) -> dict:
    t0 = time.perf_counter()
    r = evaluate(model, tokenizer, heldout, TOPICS, Sampling(max_new_tokens=p.max_new_tokens),
                 p.eval_batch_size, max_prompt_tokens=p.max_length, max_length=p.max_length, with_perplexity=False)
    r["perplexity"] = perplexity(model, tokenizer, heldout[:p.perplexity_examples], p.max_length, p.eval_batch_size)
    _say(f"{name}: accuracy {r['accuracy']:.1f}, macro-F1 {r['macro_f1']:.1f}, "
         f"perplexity {r['perplexity']:.2f} ({time.perf_counter() - t0:.0f} s)")
    return r


def _result(p: Preset, partition: str, alpha: float, command: str, task, fed, central_losses, metrics, load_start) -> dict:
    split_names = [k for k in metrics if k.startswith("split-fed")]
    keys = ("accuracy", "macro_f1", "exact_match", "rouge_l", "perplexity")
    split_mean = {k: sum(metrics[n][k] for n in split_names) / len(split_names) for k in keys}
    table = [("zero-shot (base)", metrics["zero-shot"]), ("centralized", metrics["centralized"]),
             ("split-fed (mean of silos)", split_mean)] + [(n, metrics[n]) for n in split_names]
    gap = split_mean["accuracy"] - metrics["centralized"]["accuracy"]
    zero = metrics["zero-shot"]["accuracy"]
    verdict = {"split_accuracy": split_mean["accuracy"], "centralized_accuracy": metrics["centralized"]["accuracy"],
               "zero_shot_accuracy": zero, "accuracy_gap": gap, "within_one_point": abs(gap) <= 1.0,
               "both_clearly_above_zero_shot": min(split_mean["accuracy"], metrics["centralized"]["accuracy"])
               >= zero + CLEARLY_ABOVE_POINTS}
    verdict["disagreements"] = {n: _disagreements(metrics["centralized"], metrics[n]) for n in split_names}
    return {"command": command, "preset": p.to_dict(), "partition": partition, "alpha": alpha,
            "data": task.summary(), "run_id": fed.run_id, "cpus": os.cpu_count(), "load_start": load_start,
            "split_losses": fed.rows, "centralized_losses": central_losses,
            "table": [(n, {k: m.get(k) for k in keys}) for n, m in table], "verdict": verdict,
            "metrics": {n: {k: v for k, v in m.items() if k != "predictions"} for n, m in metrics.items()},
            "predictions": {n: m.get("predictions", []) for n, m in metrics.items()}}


def _disagreements(central: dict, split: dict) -> dict:
    """Paired on the same articles: how many only one of the two models gets right (the noise scale)."""
    pairs = list(zip(central["predictions"], split["predictions"]))
    return {"only_centralized_right": sum(c["label"] == c["reference"] != s["label"] for c, s in pairs),
            "only_split_right": sum(s["label"] == s["reference"] != c["label"] for c, s in pairs)}


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _say(text: str) -> None:
    click.echo(f"[experiment] {text}", err=True)
