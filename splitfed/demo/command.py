"""`splitfed demo`: a whole local federation in one command, with an optional centralized check."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import click

from splitfed.reference.centralized import centralized_run
from shared.model.models import resolve_model_dir
from splitfed.demo.federation_run import DemoConfig
from splitfed.demo.runner import run_federation
from splitfed.demo.summary import print_summary
from splitfed.demo.weights_check import WeightsMismatch, load_run_weights, max_abs_weight_diff
from shared.wire.compression import CAST_FORMATS


@click.command("demo")
@click.option("--mode", type=click.Choice(["serial", "client-batch", "hierarchical"]), default="serial", show_default=True)
@click.option("--silos", type=click.IntRange(1, 64), default=2, show_default=True, help="number of silo agents")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="training steps per silo")
@click.option("--local-steps", type=click.IntRange(1), default=10, show_default=True, help="steps per round (K)")
@click.option("--model", default="smollm2", show_default=True, help="'smollm2', 'gemma3' (Gemma 3 270M), 'qwen2.5-coder-0.5b', 'tiny' or a model directory")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-length", type=click.IntRange(8), default=128, show_default=True)
@click.option("--adapter", type=click.Choice(["lora", "prefix", "full"]), default="lora", show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--wire-dtype", type=click.Choice(["fp32", "bf16", "fp16", "int8", "fp8-e4m3", "fp8-e5m2", "auto8"]), default="fp32",
              show_default=True, help="int8 / fp8-*: 8-bit values with a bfloat16 scale per token (lossy)")
@click.option("--micro-batches", default="1", show_default=True, metavar="N|auto",
              help="each silo cuts its step into N micro-batches in flight at once (exact gradient accumulation, "
                   "hides the network's round trip); auto: enough to cover the measured round trip")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="compute dtype of every role's weights and activations (LoRA/prefix and AdamW state stay fp32)")
@click.option("--encryption/--no-encryption", default=True, show_default=True,
              help="seal every tensor end to end (throwaway keys are generated and enrolled for the run)")
@click.option("--curve", is_flag=True, help="also CurveZMQ on every socket, with a ZAP allow-list at the broker")
@click.option("--aggregation", type=click.Choice(["fedavg", "none"]), default="fedavg", show_default=True,
              help="at each round's end average the silos' head/tail weights (secure aggregation) or keep them")
@click.option("--personalize", is_flag=True, help="hierarchical: keep each silo's trunk adapter (no trunk averaging)")
@click.option("--workers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="trunk worker processes (hierarchical mode spreads the silos over them)")
@click.option("--max-inflight", type=click.IntRange(1), default=2, show_default=True,
              help="hierarchical: open steps per trunk worker (bounds its activation memory)")
@click.option("--recompute-forward", is_flag=True,
              help="trunk keeps only each step's input and runs its forward again at the backward "
                   "(one step's activations at a time however many are open, for one more forward per step)")
@click.option("--trunk-quant", type=click.Choice(["none", "nf4", "int8"]), default="none", show_default=True,
              help="trunk base weights in NF4 or int8 (bitsandbytes, QLoRA: the LoRA stays fp32)")
@click.option("--batch-window-ms", type=click.IntRange(1), default=10000, show_default=True,
              help="client-batch: longest wait for a step's FORWARDs after the first one")
@click.option("--cut-clip-norm", type=click.FloatRange(min=0, min_open=True), default=None,
              help="privacy defense: clip each cut activation token to this L2 norm on the silo")
@click.option("--cut-noise-sigma", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="privacy defense: Gaussian noise std on the (clipped) cut activations")
@click.option("--privacy-strength", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="learned privacy defense: lambda of the silos' privacy adapter, trained against each silo's "
                   "own inverter (0: off; other SPLITFED_PRIVACY_* settings via --role-env)")
@click.option("--kill", "kills", multiple=True, metavar="ROLE@STEP|ROLE@POINT",
              help="fault injection: SIGKILL ROLE (broker, trunk, siloN, redis) when the run reaches STEP, "
                   "or at a named fail point (broker@uncommitted-hello: between the first round's aggregation "
                   "and its commit), then restart it as a supervisor would (repeatable)")
@click.option("--role-env", "role_env", multiple=True, metavar="ROLE:SPLITFED_NAME=VALUE",
              help="extra environment for one role only (broker, trunk or siloN), e.g. silo1:SPLITFED_HEAD_LAYERS=2 "
                   "to see a role whose settings differ from the run's refused (repeatable)")
@click.option("--hosts", type=click.Choice(["local", "netns"]), default="local", show_default=True,
              help="netns: the server side (Redis, broker, trunk) and each silo on a network namespace of its "
                   "own, each silo linked to the server only, reaching only the broker's port (needs root)")
@click.option("--check-centralized", is_flag=True,
              help="also train in one process without network and compare losses and final weights")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the run's results here")
@click.option("--key-prefix", default="splitfed", show_default=True, envvar="SPLITFED_KEY_PREFIX",
              help="namespace of the run's Redis keys [env SPLITFED_KEY_PREFIX]")
@click.option("--run-dir", type=click.Path(path_type=Path), help="keep logs, data and weights here (default: a temp dir, removed on success)")
def demo(json_path: Path | None, check_centralized: bool, run_dir: Path | None, key_prefix: str, **options) -> None:
    """Start Redis, a broker, a trunk worker and N silos as processes, train, and summarise."""
    cfg = DemoConfig(**options)
    if cfg.micro_batches != "auto" and not (cfg.micro_batches.isdigit() and 1 <= int(cfg.micro_batches) <= cfg.batch_size):
        raise click.BadParameter(f"{cfg.micro_batches!r}: a number from 1 to the batch size ({cfg.batch_size}), or auto",
                                 param_hint="--micro-batches")
    if cfg.micro_batches != "1" and cfg.mode == "hierarchical":
        raise click.UsageError("--micro-batches works in serial and client-batch mode")
    try:
        cfg.role_envs()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if cfg.mode == "hierarchical" and cfg.adapter == "full":
        raise click.UsageError("--mode hierarchical keeps one trunk adapter per silo: use --adapter lora or prefix")
    if cfg.dtype != "fp32" and cfg.adapter == "full":
        raise click.UsageError(f"--adapter full trains in fp32 only (no master weights for {cfg.dtype}): use lora or prefix")
    if cfg.dtype != "fp32" and check_centralized:
        raise click.UsageError("--check-centralized compares to 1e-5 in fp32: run it with --dtype fp32")
    if cfg.workers > 1 and cfg.mode != "hierarchical":
        raise click.UsageError("--workers > 1 needs --mode hierarchical (serial and client-batch share one trunk adapter)")
    started = time.perf_counter()
    click.echo(f"splitfed demo: {cfg.mode} mode, {cfg.silos} silos x {cfg.steps} steps, model {cfg.model}, "
               f"{'encrypted end to end' if cfg.encryption else 'NOT encrypted'}", err=True)
    model_dir = resolve_model_dir(cfg.model)  # build/convert once here, so the roles only load
    keep_dir = run_dir is not None
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="splitfed-demo-"))
    run_dir.mkdir(parents=True, exist_ok=True)

    result, rows = run_federation(cfg, run_dir, key_prefix, started)
    if check_centralized:
        if cfg.cut_clip_norm or cfg.cut_noise_sigma or cfg.privacy_strength:
            click.echo("note: the reference has no cut defense and no privacy adapter; expect the losses to differ",
                       err=True)
        if cfg.wire_dtype not in CAST_FORMATS:
            click.echo(f"note: the reference has no wire; {cfg.wire_dtype} is lossy, expect the losses to differ "
                       "(its accuracy effect: splitfed experiment bbc --wire-dtype; its error: splitfed bench wire)",
                       err=True)
        click.echo("centralized reference: same parts, data order and optimizer in one process...", err=True)
        t0 = time.perf_counter()
        ref = centralized_run(model_dir, cfg, [run_dir / "data" / f"{s}.jsonl" for s in cfg.silo_ids])
        result["centralized_wall_s"] = round(time.perf_counter() - t0, 3)
        by_key = {(r["silo_index"], r["step"]): r["loss"] for r in ref.history}
        result["centralized_losses"] = [by_key[(r["silo_index"], r["step"])] for r in rows]
        result["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(result["losses"], result["centralized_losses"]))
        try:  # after the last optimizer step and the last round's FedAvg, which no loss shows
            diff, count = max_abs_weight_diff(load_run_weights(run_dir / "weights"), ref.weights)
        except WeightsMismatch as exc:
            raise click.ClickException(f"the run's final weights do not fit the reference's: {exc} "
                                       f"(weights in {run_dir / 'weights'})") from None
        result["max_abs_weight_diff"], result["weight_tensors_compared"] = diff, count
    print_summary(result, rows)
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))
        click.echo(f"wrote {json_path}", err=True)
    if not keep_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


