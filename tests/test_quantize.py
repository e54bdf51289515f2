"""A quantized trunk base (--trunk-quant nf4|int8, bitsandbytes' CPU backend): the blocks' linears are
swapped for their quantized twins with the same weights, shrink as they should, stay close to the
unquantized blocks, and LoRA on top of them trains while the base gets no gradient.

Measured on a 6-layer, hidden-128 tiny Llama (trunk = 4 blocks, 28 linears): fp32 weights 2.36 MB ->
0.31 MB in NF4 (0.13x, absmax scales included) and 0.59 MB in int8 (0.25x); the blocks' residual update
differs from the unquantized one by 28% (NF4 on random init weights, compounding over 4 blocks) and 2%
(int8). Split vs unsplit with the same quantized base is exact: `splitfed demo --trunk-quant nf4
--check-centralized` (tests/test_modes_processes.py) matches to 0.0 in every mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.model.adapters import AdapterConfig, apply_adapter
from shared.model.part_loading import build_part
from shared.model.tiny_models import make_tiny_model_dir
from shared.model.model_split import positions_from_mask
from shared.model.optim import make_optimizer
from shared.model.quantize import QuantizationUnavailable, quantize_linears, weight_bytes

HIDDEN = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("quant") / "m", hidden_size=HIDDEN, num_layers=6,
                               vocab_size=300)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, HIDDEN, generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    return x, mask, positions_from_mask(mask)


@pytest.mark.parametrize("kind, max_bytes_ratio, max_rel_err", [("nf4", 0.15, 0.4), ("int8", 0.27, 0.05)])
def test_quantized_trunk_is_smaller_and_close(model_dir, kind, max_bytes_ratio, max_rel_err):
    ref = build_part(model_dir, "trunk", 1, 1)
    trunk = build_part(model_dir, "trunk", 1, 1)
    before = weight_bytes(trunk)
    assert quantize_linears(trunk, kind, torch.float32, torch.device("cpu")) == 4 * 7  # q,k,v,o,gate,up,down
    assert not any(type(m) is nn.Linear for m in trunk.modules())
    assert weight_bytes(trunk) <= max_bytes_ratio * before
    x, mask, pos = _inputs()
    with torch.no_grad():
        want, got = ref(x, mask, pos), trunk(x, mask, pos)
    rel = ((got - want).norm() / (want - x).norm()).item()  # of the blocks' update, not of the residual
    assert 0 < rel <= max_rel_err


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_trains_on_a_quantized_base_that_gets_no_gradient(model_dir, kind, dtype):
    trunk = build_part(model_dir, "trunk", 1, 1, dtype=dtype)
    quantize_linears(trunk, kind, dtype, torch.device("cpu"))
    trainable = apply_adapter(trunk, AdapterConfig(lora_init_b="random"), seed=0)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # fp32 masters over the 4/8-bit base
    frozen = [p for p in trunk.parameters() if not p.requires_grad]
    optimizer = make_optimizer(trainable, 1e-2, 0.0)
    x, mask, pos = _inputs()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(6):
        out = trunk(x.to(dtype).requires_grad_(True), mask, pos)
        loss = ((out.float() - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.grad is None for p in frozen)


def test_unknown_or_missing_quantization_is_a_clear_error(model_dir, monkeypatch):
    trunk = build_part(model_dir, "trunk", 1, 1)
    assert quantize_linears(trunk, "none", torch.float32, torch.device("cpu")) == 0
    with pytest.raises(QuantizationUnavailable, match="unknown quantization 'fp4'"):
        quantize_linears(trunk, "fp4", torch.float32, torch.device("cpu"))
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(QuantizationUnavailable, match=r"needs bitsandbytes .*splitfed\[quant\]"):
        quantize_linears(trunk, "nf4", torch.float32, torch.device("cpu"))
    assert any(type(m) is nn.Linear for m in trunk.modules())  # nothing half-swapped


def test_the_trunk_loads_its_base_quantized_and_refuses_full_fine_tuning_of_it(model_dir, caplog):
    from shared.runtime.settings import TrunkSettings
    from trunk_worker.base_model import load_trunk_base

    with pytest.raises(ValueError, match="--trunk-quant nf4 freezes the trunk's base: use --adapter lora or prefix"):
        load_trunk_base(model_dir, TrunkSettings(trunk_quant="nf4", adapter="full"))
    with caplog.at_level("INFO", logger="trunk"):
        trunk, _ = load_trunk_base(model_dir, TrunkSettings(trunk_quant="nf4", head_layers=1, tail_layers=1))
    assert not any(type(m) is nn.Linear for m in trunk.modules())  # every block's linears swapped while loading
    assert "trunk base quantized to nf4: 28 linear layers" in caplog.text  # 4 middle blocks x 7
