"""`splitfed audit invert`: play the curious trunk operator against a silo's cut activations."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from splitfed.audit.utility import FinetuneSpec

FAST_DEFAULTS_NOTE = ("defaults: about 20 minutes for smollm2 on a busy 2-core CPU (reports/privacy took 23 min with one "
                      "more noise row), 40 s for tiny")


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 0:
        raise click.BadParameter(f"expected block counts >= 0, got {value!r}")
    return out


def _sigma_list(ctx, param, value: str) -> tuple[float, ...] | None:
    if value == "auto":
        return None
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or comma-separated numbers, got {value!r}") from None
    if not out or any(not s > 0 for s in out):  # `not s > 0` also rejects nan
        raise click.BadParameter(f"every sigma must be > 0 (clipping alone is always a row), got {value!r}")
    return out


@click.group("audit")
def audit() -> None:
    """Privacy audits of what the silo sends to the trunk."""


@audit.command("invert")
@click.option("--model", default="smollm2", show_default=True, help="tiny | smollm2 | a model directory")
@click.option("--victims", type=click.IntRange(1, 2000), default=16, show_default=True,
              help="private texts attacked (first window of each article of the silo's topics)")
@click.option("--max-tokens", type=click.IntRange(4, 512), default=48, show_default=True, help="tokens per text")
@click.option("--shadow", type=click.IntRange(1, 100000), default=768, show_default=True,
              help="windows of public shadow text the learned attacker trains on")
@click.option("--cuts", default="0,1,2", show_default=True, callback=_int_list,
              help="head blocks of the undefended rows (0 = the embeddings only)")
@click.option("--defense-cut", type=click.IntRange(1), default=1, show_default=True,
              help="head blocks at which the defenses are applied")
@click.option("--clip-norm", type=click.FloatRange(min=0, min_open=True), default=None,
              help="per-token L2 clip of the defenses [default: median token norm at --defense-cut]")
@click.option("--sigma", "sigmas", default="auto", show_default=True, callback=_sigma_list,
              help="comma-separated noise std per coordinate; auto = noise norm 0.25, 1, 4, 16 x the clip norm")
@click.option("--learned-steps", type=click.IntRange(0), default=120, show_default=True,
              help="training steps of the learned attacker (a), per row")
@click.option("--optim-steps", type=click.IntRange(0), default=60, show_default=True,
              help="gradient steps of the optimization attack (b), per row")
@click.option("--optim-lr", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="optimization attack step size, in units of the embeddings' RMS")
@click.option("--finetune-steps", type=click.IntRange(0), default=8, show_default=True,
              help="LoRA fine-tune steps measuring each defense's utility cost")
@click.option("--finetune-batch", type=click.IntRange(1), default=4, show_default=True)
@click.option("--eval-examples", type=click.IntRange(1, 399), default=24, show_default=True,
              help="held-out BBC articles scored after each fine-tune")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads [default: torch's]")
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="write invert.json, invert.md and invert.png here")
@click.option("--json", "json_path", default=None, help="write the JSON document here ('-' = stdout)")
def invert(model, victims, max_tokens, shadow, cuts, defense_cut, clip_norm, sigmas, learned_steps, optim_steps,
           optim_lr, finetune_steps, finetune_batch, eval_examples, seed, threads, out_dir, json_path) -> None:
    """Invert the cut activations of a silo's private BBC texts: token recovery, BLEU-4 and ROUGE-L
    of three attacks for each cut and defense, beside each defense's fine-tune cost.

    Progress goes to stderr. The """ + FAST_DEFAULTS_NOTE + "."
    from splitfed.audit.report import markdown, write_report
    from splitfed.audit.runner import AuditConfig, run_audit

    _check_model(model, threads)
    cfg = AuditConfig(model=model, victims=victims, max_tokens=max_tokens, shadow=shadow, cuts=cuts,
                      defense_cut=defense_cut, clip_norm=clip_norm, sigmas=sigmas, learned_steps=learned_steps,
                      optim_steps=optim_steps, optim_lr=optim_lr, seed=seed,
                      finetune=FinetuneSpec(steps=finetune_steps, batch_size=finetune_batch,
                                            eval_examples=eval_examples, seed=seed))
    started = time.perf_counter()

    def log(line: str) -> None:
        click.echo(f"[{time.perf_counter() - started:6.0f} s] {line}", err=True)

    try:
        doc = run_audit(cfg, log)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if out_dir is not None:
        for path in write_report(doc, out_dir):
            click.echo(f"wrote {path}", err=True)
    if json_path == "-":
        click.echo(json.dumps(doc, indent=1))
    elif json_path:
        Path(json_path).write_text(json.dumps(doc, indent=1) + "\n")
        click.echo(f"wrote {json_path}", err=True)
    if json_path != "-":
        sys.stdout.write(markdown(doc))


def _numbers(value: str, zero_ok: bool) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if any(not (s >= 0 if zero_ok else s > 0) for s in out):  # the negated test also rejects nan
        bound = "every strength must be >= 0" if zero_ok else "every value must be > 0 (no defense is always a row)"
        raise click.BadParameter(f"{bound}, got {value!r}")
    return out


def _float_list(ctx, param, value: str) -> tuple[float, ...]:
    return _numbers(value, zero_ok=False)


def _strength_list(ctx, param, value: str) -> tuple[float, ...]:
    """Like _float_list but 0 allowed: a bottleneck at lambda 0 is still a defense (no adversary)."""
    return _numbers(value, zero_ok=True)


def _positive_ints(message: str):
    """A callback for a comma-separated list of integers >= 1 ('' for none)."""
    def parse(ctx, param, value: str) -> tuple[int, ...]:
        if not value.strip():
            return ()
        out = _int_list(ctx, param, value)
        if min(out) < 1:
            raise click.BadParameter(f"{message}, got {value!r}")
        return out
    return parse


_cut_list = _positive_ints("a silo keeps at least one head block: expected cuts >= 1")
_rank_list = _positive_ints("expected bottleneck ranks >= 1")


@audit.command("defend")
@click.option("--model", default="smollm2", show_default=True, help="tiny | smollm2 | a model directory")
@click.option("--victims", type=click.IntRange(1, 2000), default=16, show_default=True)
@click.option("--max-tokens", type=click.IntRange(4, 512), default=48, show_default=True)
@click.option("--shadow", type=click.IntRange(1, 100000), default=768, show_default=True)
@click.option("--cuts", default="1,2,4", show_default=True, callback=_cut_list,
              help="head blocks of the undefended rows ('' for none)")
@click.option("--defense-cut", type=click.IntRange(1), default=1, show_default=True,
              help="head blocks of the noise rows")
@click.option("--sigma", "sigmas", default="0.5,2", show_default=True, callback=_float_list,
              help="clip + noise rows: noise std per coordinate ('' for none)")
@click.option("--strengths", default="0.1,0.3,1", show_default=True, callback=_float_list,
              help="learned-defense rows: lambda, the weight of the silo inverter's loss ('' for none)")
@click.option("--learned-cuts", default="1", show_default=True, callback=_cut_list,
              help="head blocks at which every strength is run")
@click.option("--learned-sigma", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="noise after the privacy adapter (clipped to the median norm first when > 0)")
@click.option("--rank", type=click.IntRange(1), default=32, show_default=True, help="privacy adapter's low rank")
@click.option("--bottleneck-ranks", default="", show_default=True, callback=_rank_list,
              help="rank-k bottleneck rows U(D(h1)) at each --learned-cuts ('' for none; each k < hidden size)")
@click.option("--bottleneck-strengths", default="1", show_default=True, callback=_strength_list,
              help="lambda of each bottleneck row (0 allowed: the bottleneck without its adversary)")
@click.option("--inverter-steps", type=click.IntRange(1), default=2, show_default=True,
              help="silo-inverter updates per fine-tune step")
@click.option("--inverter-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--adapter-lr", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(0), default=0, show_default=True,
              help="head-only warm-up steps of the learned defense (inverter vs adapter + distortion)")
@click.option("--distortion", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="warm-up weight of the adapter's relative change of h1")
@click.option("--learned-steps", type=click.IntRange(0), default=120, show_default=True, help="attacker training steps")
@click.option("--optim-steps", type=click.IntRange(0), default=60, show_default=True)
@click.option("--public-attack/--no-public-attack", default=True, show_default=True,
              help="also attack learned rows with the public-weights attacker (a)")
@click.option("--finetune-steps", type=click.IntRange(0), default=8, show_default=True)
@click.option("--finetune-batch", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-length", type=click.IntRange(8, 4096), default=96, show_default=True,
              help="fine-tune example length in tokens")
@click.option("--eval-examples", type=click.IntRange(1, 399), default=24, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads [default: torch's]")
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="write defend.json, defend.md (after every row) and defend.png here")
def defend(model, victims, max_tokens, shadow, cuts, defense_cut, sigmas, strengths, learned_cuts, learned_sigma,
           rank, bottleneck_ranks, bottleneck_strengths, inverter_steps, inverter_lr, adapter_lr, warmup_steps,
           distortion, learned_steps, optim_steps, public_attack, finetune_steps, finetune_batch, max_length,
           eval_examples, seed, threads, out_dir) -> None:
    """Attack each defense (none at deeper heads, clip + noise, the learned privacy adapter or bottleneck)
    with an attacker retrained on the silo's trained, defended head, beside the defense's BBC accuracy."""
    from splitfed.audit.defend_report import markdown, write_report
    from splitfed.audit.defended import DefendConfig, run_defend

    _check_model(model, threads)
    cfg = DefendConfig(model=model, victims=victims, max_tokens=max_tokens, shadow=shadow, cuts=cuts,
                       defense_cut=defense_cut, sigmas=sigmas, strengths=strengths, learned_cuts=learned_cuts,
                       learned_sigma=learned_sigma, rank=rank, bottleneck_ranks=bottleneck_ranks,
                       bottleneck_strengths=bottleneck_strengths, inverter_steps=inverter_steps,
                       inverter_lr=inverter_lr, adapter_lr=adapter_lr, warmup_steps=warmup_steps, distortion=distortion,
                       learned_steps=learned_steps, optim_steps=optim_steps, public_attack=public_attack,
                       seed=seed,
                       finetune=FinetuneSpec(steps=finetune_steps, batch_size=finetune_batch, max_length=max_length,
                                             eval_examples=eval_examples, seed=seed))
    started = time.perf_counter()

    def log(line: str) -> None:
        click.echo(f"[{time.perf_counter() - started:6.0f} s] {line}", err=True)

    def partial(doc: dict) -> None:  # a long run leaves a usable report after every row
        if out_dir is not None:
            write_report(doc, out_dir, with_png=False)

    try:
        doc = run_defend(cfg, log, partial)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if out_dir is not None:
        for path in write_report(doc, out_dir):
            click.echo(f"wrote {path}", err=True)
    sys.stdout.write(markdown(doc))


@audit.command("defend-merge")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="write the merged defend.json, defend.md and defend.png here")
def defend_merge(runs, out_dir) -> None:
    """Merge the defend.json of several `audit defend` runs (same model, texts and budgets) into one report."""
    from splitfed.audit.defend_report import markdown, merge, write_report

    try:
        doc = merge([json.loads(Path(p).read_text()) for p in runs])
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"cannot merge: {exc}") from None
    for path in write_report(doc, out_dir):
        click.echo(f"wrote {path}", err=True)
    sys.stdout.write(markdown(doc))


def _check_model(model: str, threads: int | None) -> None:
    """The thread count for torch, and a clear usage error for a model that cannot be resolved."""
    import torch

    from shared.model.models import resolve_model_dir

    if threads:
        torch.set_num_threads(threads)
    try:
        resolve_model_dir(model)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
