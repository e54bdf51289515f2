"""`splitfed experiment bbc --split-only`: the split-fed arm alone, to compare runs of the arm with each
other (wire formats, seeds) without paying for the centralized arm and zero-shot again.

After the last round's secure FedAvg every silo holds the same head/tail adapter and they share the
trunk's, so their models are one model: when the silos' adapter files hold identical tensors it is
evaluated once (and said so); otherwise each silo is evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.model.adapter_files import load_adapter_file


def identical_adapter_files(paths: list[Path]) -> bool:
    first = load_adapter_file(paths[0])[0]
    for path in paths[1:]:
        other = load_adapter_file(path)[0]
        if other.keys() != first.keys() or any(not torch.equal(first[k], other[k]) for k in first):
            return False
    return True


def write_result(out_dir: Path, command: str, preset: dict, partition: str, data: dict, run_id: str,
                 rows: list[dict], metrics: dict[str, dict], evaluated_once: bool, timing: dict) -> dict:
    """result.json of a split-only run: the losses and each silo's held-out metrics."""
    keys = ("accuracy", "macro_f1", "exact_match", "rouge_l", "perplexity")
    mean = {k: sum(m[k] for m in metrics.values()) / len(metrics) for k in keys}
    result = {"command": command, "preset": preset, "partition": partition, "data": data, "run_id": run_id,
              "split_only": True, "silos_identical_evaluated_once": evaluated_once,
              "split_losses": rows, "split_mean": mean,
              "metrics": {n: {k: v for k, v in m.items() if k != "predictions"} for n, m in metrics.items()},
              "predictions": {n: m.get("predictions", []) for n, m in metrics.items()}, "timing": timing}
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result
