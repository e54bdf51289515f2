"""The final weights of a run against its reference's, file by file and tensor by tensor.

A run leaves ``<silo>.safetensors`` (head + tail), ``trunk.safetensors`` and, hierarchical,
``trunk-<silo>.safetensors`` in its weights directory; the reference returns the same tensors under
the same file stems and names (splitfed/reference/centralized.py). Equal losses can hide a wrong last optimizer
step or a wrong last FedAvg (no loss is computed after them): the weights cannot.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


class WeightsMismatch(ValueError):
    """The run and the reference do not hold the same tensors (names, files or shapes)."""


def load_run_weights(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every ``*.safetensors`` in ``directory`` by file stem (temporary ``.tmp`` files do not match)."""
    return {path.stem: load_file(str(path)) for path in sorted(Path(directory).glob("*.safetensors"))}


def _difference(what: str, got: set[str], want: set[str]) -> str:
    missing, extra = sorted(want - got), sorted(got - want)
    parts = ([f"missing {missing[:5]}"] if missing else []) + ([f"unexpected {extra[:5]}"] if extra else [])
    return f"{what}: {', '.join(parts)}"


def max_abs_weight_diff(run: dict[str, dict[str, torch.Tensor]], reference: dict[str, dict[str, torch.Tensor]]
                        ) -> tuple[float, int]:
    """(max |run - reference| over every element of every tensor, number of tensors compared).

    A file or tensor that only one side has is an error, never skipped: skipping would let a part
    that is not saved, or not trained, pass the check.
    """
    if run.keys() != reference.keys():
        raise WeightsMismatch(_difference("weight files", set(run), set(reference)))
    diffs = [torch.zeros((), dtype=torch.float64)]
    for stem in sorted(reference):
        got, want = run[stem], reference[stem]
        if got.keys() != want.keys():
            raise WeightsMismatch(_difference(f"tensors of {stem}.safetensors", set(got), set(want)))
        for name in sorted(want):
            a, b = got[name], want[name]
            if a.shape != b.shape:
                raise WeightsMismatch(f"{stem}.safetensors {name}: shape {tuple(a.shape)}, reference {tuple(b.shape)}")
            if a.numel():  # float64: the difference itself must not round away
                diffs.append((a.double() - b.detach().double().cpu()).abs().max())
    # torch's max keeps a NaN (python's max() would drop it): a NaN weight must fail the check
    return float(torch.stack(diffs).max()), sum(len(w) for w in reference.values())
