"""Round checkpoints: exact round trip of tensors and AdamW state, atomic files, two kept."""

from __future__ import annotations

import pytest
import torch

from shared.state import checkpoint
from shared.model.optim import make_optimizer


def _trained(seed: int):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = make_optimizer(params, 1e-2, 0.01)
    for _ in range(3):
        (params[0].sum() * 2 + params[1].pow(2).sum()).backward()
        opt.step()
        opt.zero_grad()
    return params, opt


def test_round_trip_continues_training_identically(tmp_path):
    params, opt = _trained(0)
    tensors = {f"param/{i}": p for i, p in enumerate(params)} | checkpoint.optimizer_tensors(opt)
    checkpoint.save(tmp_path, 4, tensors, {"round": 4, "history": [{"step": 1}]})

    fresh, fresh_opt = _trained(1)  # other values and state, to be overwritten
    loaded, meta = checkpoint.load(tmp_path, 4)
    with torch.no_grad():
        for i, p in enumerate(fresh):
            p.copy_(loaded[f"param/{i}"])
    checkpoint.load_optimizer_tensors(fresh_opt, loaded)
    assert meta == {"round": 4, "history": [{"step": 1}]}
    for a, b in ((params, opt), (fresh, fresh_opt)):
        (a[0].sum() * 2 + a[1].pow(2).sum()).backward()
        b.step()
    assert all(torch.equal(x, y) for x, y in zip(params, fresh))


def test_keeps_the_two_newest_and_leaves_no_temporary(tmp_path):
    for rnd in (-1, 0, 1, 2):
        checkpoint.save(tmp_path, rnd, {"x": torch.full((2,), float(rnd))}, {})
    assert checkpoint.rounds_on_disk(tmp_path) == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))
    assert checkpoint.load(tmp_path, 0) is None
    assert checkpoint.load(tmp_path, 2)[0]["x"].tolist() == [2.0, 2.0]


def test_optimizer_state_for_more_parameters_is_refused(tmp_path):
    params, opt = _trained(0)
    state = checkpoint.optimizer_tensors(opt)
    small = make_optimizer([torch.nn.Parameter(torch.zeros(4, 3))], 1e-2, 0.0)
    with pytest.raises(ValueError, match="optimizer state"):
        checkpoint.load_optimizer_tensors(small, state)
