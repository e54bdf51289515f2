"""A trunk over several devices (--devices): contiguous block spans placed by accelerate's
dispatch_model, activations moved by its hooks. This host has no GPU, so the hook path runs with
CPU "devices" (force_hooks): the spread trunk must compute exactly what the unspread one does,
forward and every gradient (measured: 0.0, the same kernels in the same order)."""

from __future__ import annotations

import pytest
import torch

from shared.model.adapters import AdapterConfig, apply_adapter
from shared.model.part_loading import build_part
from shared.model.tiny_models import make_tiny_model_dir
from shared.model.model_split import positions_from_mask
from shared.runtime.settings import TrunkSettings
from trunk_worker.base_model import load_trunk_base
from trunk_worker.placement import PlacementError, block_spans, parse_devices, spread_over_devices


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("placement") / "m", hidden_size=64, num_layers=7,
                               vocab_size=200)


def test_blocks_split_into_contiguous_even_spans():
    assert block_spans([2, 3, 4, 5, 6], 2) == [[2, 3, 4], [5, 6]]
    assert block_spans([1, 2, 3, 4], 4) == [[1], [2], [3], [4]]
    with pytest.raises(PlacementError, match="3 devices for 2 trunk blocks"):
        block_spans([1, 2], 3)


def test_devices_are_checked_before_anything_loads():
    assert parse_devices("cpu, cpu") == [torch.device("cpu")] * 2
    with pytest.raises(PlacementError, match="empty"):
        parse_devices(" , ")
    with pytest.raises(PlacementError, match="not a torch device"):
        parse_devices("cpu,gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(PlacementError, match="no CUDA device"):
            parse_devices("cuda:0,cuda:1")


def test_a_spread_trunk_computes_exactly_what_one_device_does(model_dir):
    cfg = AdapterConfig()
    single = build_part(model_dir, "trunk", 1, 1)
    spread = build_part(model_dir, "trunk", 1, 1)
    placed = spread_over_devices(spread, [torch.device("cpu")] * 3)
    assert [k for k in placed if ".layers." in k] == [f"model.layers.{i}" for i in range(1, 6)]
    assert placed["model.rotary_emb"] == "cpu"
    assert any(hasattr(m, "_hf_hook") for m in spread.modules())  # the hooks really are in the path
    outs, grads = [], []
    for trunk in (single, spread):
        params = apply_adapter(trunk, cfg, seed=0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 9, 64, generator=g, requires_grad=True)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        out = trunk(x, mask, positions_from_mask(mask))
        out.backward(torch.randn(out.shape, generator=g))
        outs.append(out.detach())
        grads.append([x.grad, *[p.grad for p in params]])
    assert torch.equal(outs[0], outs[1])
    assert len(grads[0]) == len(grads[1]) > 1 and all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_worker_loads_a_spread_trunk_and_refuses_what_it_cannot_place(model_dir, caplog):
    with caplog.at_level("INFO", logger="trunk"):
        trunk, first = load_trunk_base(model_dir, TrunkSettings(devices="cpu,cpu", head_layers=1, tail_layers=1))
    assert first == torch.device("cpu")
    assert "trunk blocks over 2 devices: cpu 1-5" in caplog.text  # both spans on the one CPU
    with pytest.raises(PlacementError, match="--devices with --trunk-quant is not supported yet"):
        load_trunk_base(model_dir, TrunkSettings(devices="cpu,cpu", trunk_quant="nf4"))
    with pytest.raises(PlacementError, match="6 devices for 5 trunk blocks"):
        load_trunk_base(model_dir, TrunkSettings(devices=",".join(["cpu"] * 6), head_layers=1, tail_layers=1))
