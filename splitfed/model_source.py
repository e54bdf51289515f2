"""Which trained model a command means: the base model, a split run's files, or an exported adapter.

Shared by `splitfed eval` and `splitfed export`: the same options, the same checks, the same
clear errors (a missing file, a file of another run's settings, a half-given split).
"""

from __future__ import annotations

from pathlib import Path

import click

from shared.model.adapter_files import AdapterFileError, load_split_adapters
from shared.model.adapters import AdapterConfig
from splitfed.evaluation.peft_format import PeftFormatError, load_peft_adapter


def source_options(fn):
    """--silo-weights/--trunk-weights (a split run), or --peft-dir (an export), and adapter settings."""
    options = [
        click.option("--model", default="smollm2", show_default=True, help="'smollm2', 'tiny' or a model directory"),
        click.option("--silo-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="a silo's head/tail adapter file (<silo>.safetensors from --save-dir)"),
        click.option("--trunk-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="the trunk's adapter file (trunk.safetensors from the trunk's --save-dir)"),
        click.option("--adapter", type=click.Choice(["lora", "prefix", "full"]), default="lora", show_default=True,
                     help="what the split run trained (as its --adapter)"),
        click.option("--lora-r", type=click.IntRange(1), default=8, show_default=True),
        click.option("--lora-alpha", type=click.IntRange(1), default=16, show_default=True),
        click.option("--prefix-len", type=click.IntRange(1), default=4, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def split_adapter(silo_weights: Path | None, trunk_weights: Path | None, adapter: str, lora_r: int,
                  lora_alpha: int, prefix_len: int) -> tuple[AdapterConfig | None, dict | None]:
    """The adapter of a split run (config, merged tensors), or (None, None) for the base model."""
    if (silo_weights is None) != (trunk_weights is None):
        raise click.UsageError("a split run's model needs both --silo-weights and --trunk-weights")
    if silo_weights is None:
        return None, None
    cfg = AdapterConfig(kind=adapter, lora_r=lora_r, lora_alpha=lora_alpha, prefix_len=prefix_len)
    try:
        return cfg, load_split_adapters(silo_weights, trunk_weights, cfg)
    except AdapterFileError as exc:
        raise click.ClickException(str(exc)) from None


def peft_adapter(peft_dir: Path) -> tuple[AdapterConfig, dict]:
    try:
        return load_peft_adapter(peft_dir)
    except PeftFormatError as exc:
        raise click.ClickException(str(exc)) from None
