"""The demo's final-weights check: tensor by tensor, and nothing skipped silently."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from splitfed.demo.weights_check import WeightsMismatch, load_run_weights, max_abs_weight_diff


def _weights() -> dict[str, dict[str, torch.Tensor]]:
    return {"silo0": {"a": torch.zeros(2, 3), "b": torch.ones(4)}, "trunk": {"c": torch.arange(5.0)}}


def test_equal_weights_differ_by_zero_and_every_tensor_counts():
    assert max_abs_weight_diff(_weights(), _weights()) == (0.0, 3)


def test_the_largest_difference_of_any_element_is_reported():
    run = _weights()
    run["trunk"]["c"][3] += 2 ** -12  # exact in float32: 3 + 2^-12
    run["silo0"]["a"][1, 2] -= 1e-6
    diff, _ = max_abs_weight_diff(run, _weights())
    assert diff == 2 ** -12


def test_a_nan_weight_fails_the_check():
    run = _weights()
    run["silo0"]["b"][0] = float("nan")
    diff, _ = max_abs_weight_diff(run, _weights())
    assert math.isnan(diff) and not diff <= 1e-5


@pytest.mark.parametrize("edit, message", [
    (lambda w: w["silo0"].pop("b"), "missing ['b']"),
    (lambda w: w["trunk"].update(extra=torch.zeros(1)), "unexpected ['extra']"),
    (lambda w: w.pop("trunk"), "missing ['trunk']"),
    (lambda w: w.update({"trunk-silo0": {}}), "unexpected ['trunk-silo0']"),
    (lambda w: w["silo0"].update(a=torch.zeros(3, 2)), "shape (3, 2)"),
])
def test_a_tensor_or_file_on_one_side_only_is_an_error(edit, message):
    run = _weights()
    edit(run)
    with pytest.raises(WeightsMismatch) as exc:
        max_abs_weight_diff(run, _weights())
    assert message in str(exc.value)


def test_a_runs_weight_files_load_by_stem_without_temporary_files(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "silo0.safetensors"))
    save_file({"c": torch.ones(1)}, str(tmp_path / "trunk-silo0.safetensors"))
    (tmp_path / "silo1.safetensors.tmp").write_bytes(b"half a file")
    loaded = load_run_weights(tmp_path)
    assert sorted(loaded) == ["silo0", "trunk-silo0"] and torch.equal(loaded["silo0"]["a"], torch.ones(2))
