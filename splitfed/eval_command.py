"""`splitfed eval`: task metrics of a model on a held-out JSONL.

The model is the base model, a split run's (a silo's head/tail file + the trunk's file), or an
exported PEFT adapter. Every example is completed by split generation with KV caches; the metrics
and the label-parsing rule are documented in splitfed/evaluation/task_metrics.py and splitfed/evaluation/evaluation.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from transformers.utils import logging as hf_logging

from shared.model.adapter_files import AdapterFileError
from shared.data.dataset import DataError, load_jsonl
from splitfed.evaluation.evaluation import evaluate
from shared.model.generation import Sampling
from shared.model.models import resolve_model_dir
from shared.data.tokenizer import load_tokenizer
from splitfed.evaluation.trained_parts import load_split_model
from splitfed.model_source import peft_adapter, source_options, split_adapter


@click.command("eval")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="held-out JSONL ({prompt, completion} or {text} per line)")
@source_options
@click.option("--peft-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="an exported PEFT adapter directory (instead of --silo-weights/--trunk-weights)")
@click.option("--task", type=click.Choice(["generation", "classification"]), default="generation", show_default=True,
              help="classification adds accuracy and macro-F1 over --labels")
@click.option("--labels", help="comma-separated labels (classification; default: the distinct completions)")
@click.option("--max-new-tokens", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0: greedy")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of sampling")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--max-length", type=click.IntRange(8), default=512, show_default=True,
              help="tokens per example (prompts cut from the left, as in training)")
@click.option("--limit", type=click.IntRange(1), help="only the first N examples")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write metrics and every prediction here")
def eval_command(data_path: Path, model: str, silo_weights: Path | None, trunk_weights: Path | None, adapter: str,
                 lora_r: int, lora_alpha: int, prefix_len: int, peft_dir: Path | None, task: str, labels: str | None,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int, batch_size: int, max_length: int,
                 limit: int | None, json_path: Path | None) -> None:
    """Accuracy / macro-F1, exact match, ROUGE-L and perplexity on a held-out JSONL."""
    hf_logging.disable_progress_bar()
    try:
        examples = load_jsonl(data_path)[:limit]
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    if peft_dir is not None and silo_weights is not None:
        raise click.UsageError("give either --peft-dir or --silo-weights/--trunk-weights, not both")
    cfg, state = peft_adapter(peft_dir) if peft_dir is not None else split_adapter(
        silo_weights, trunk_weights, adapter, lora_r, lora_alpha, prefix_len)
    label_list = None
    if task == "classification":
        label_list = [x.strip() for x in labels.split(",") if x.strip()] if labels else \
            sorted({ex.completion.strip() for ex in examples if ex.prompt})
        if len(label_list) < 2:
            raise click.UsageError(f"classification needs at least two labels, got {label_list}")
    try:
        model_dir = resolve_model_dir(model)
        split_model = load_split_model(model_dir, cfg, state)
        tokenizer = load_tokenizer(model_dir)
    except (FileNotFoundError, AdapterFileError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    result = evaluate(split_model, tokenizer, examples, label_list, sampling, batch_size, max_length, max_length)
    result["model"] = {"model": model, "silo_weights": str(silo_weights or ""), "trunk_weights": str(trunk_weights or ""),
                       "peft_dir": str(peft_dir or ""), "adapter": cfg.kind if cfg else "none"}
    for key in ("accuracy", "macro_f1", "exact_match", "rouge_l", "perplexity"):
        if key in result:
            click.echo(f"{key:<12} {result[key]:.4f}")
    click.echo(f"{'examples':<12} {result['examples']}  ({result['eval_s']:.1f} s)")
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))
        click.echo(f"wrote {json_path}", err=True)
