"""shared/model/privacy_adapter.py on a tiny model: the adversarial loop works, strength 0 is off, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from shared.model.adapters import AdapterConfig, apply_adapter, unique_parameters
from shared.model.loss import causal_lm_loss
from shared.model.part_loading import build_part, build_silo_parts
from shared.model.tiny_models import make_tiny_model_dir
from shared.model.model_split import positions_from_mask
from shared.model.privacy_adapter import (
    PrivacyAdapter,
    PrivacyAdapterConfig,
    SiloInverter,
    SiloVocabulary,
    adversarial_term,
    defend,
    inversion_loss,
    inverter_step,
    privacy_module,
    warmup_step,
)

VOCAB = 260  # make_tiny_model_dir's default


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("privacy"), "llama")


def _data(seed: int = 0, rows: int = 8, tokens: int = 16, words: int = 24):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 4 + words, (rows, tokens), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, tokens - 4:] = 0  # one right-padded row
    labels = ids.masked_fill(~mask.bool(), -100)
    return ids, mask, labels


def _train(tiny_dir, strength: float, steps: int = 40, warmup: int = 30, bottleneck: int = 0):
    """The silo's loop exactly as the module's docstring lays it out, on a tiny split model; with
    ``bottleneck`` k a rank-k bottleneck in the adapter's place, started at the head output's
    principal directions (the inverter then first learns to read the bottlenecked cut).

    Returns (task losses, the silo inverter's loss before each of its task-phase updates).
    """
    torch.manual_seed(0)
    head, tail = build_silo_parts(tiny_dir, head_layers=1, tail_layers=1)
    trunk = build_part(tiny_dir, "trunk", head_layers=1, tail_layers=1)
    params = unique_parameters(*[apply_adapter(p, AdapterConfig(), seed=0) for p in (head, trunk, tail)])
    cfg = PrivacyAdapterConfig(strength=strength, rank=8, inverter_steps=2, inverter_lr=3e-3, adapter_lr=1e-2,
                               bottleneck=bottleneck)
    adapter, inverter = privacy_module(cfg, 64, seed=0), SiloInverter(64)
    opt = torch.optim.Adam(params, lr=3e-3)
    adapter_opt = torch.optim.Adam(adapter.parameters(), lr=cfg.adapter_lr)
    inverter_opt = torch.optim.Adam(inverter.parameters(), lr=cfg.inverter_lr)
    ids, mask, labels = _data()
    positions = positions_from_mask(mask)
    vocab = SiloVocabulary(ids[mask.bool()], VOCAB)
    table = vocab.table(head.get_submodule(head.facts.embed).weight)
    targets = vocab.targets(ids, mask)
    if bottleneck:
        with torch.no_grad():
            adapter.init_principal(head(ids, mask, positions), mask)
    for _ in range(warmup):  # the inverter first learns to read the undefended (bottlenecked) cut
        with torch.no_grad():
            hidden = head(ids, mask, positions)
            hidden = adapter(hidden) if bottleneck else hidden
        inverter_step(inverter, inverter_opt, hidden, targets, mask, table, cfg.inverter_steps)
    task_losses, inverter_losses = [], []
    for _ in range(steps):
        d = defend(adapter, head(ids, mask, positions), mask, None, 0.0, None)
        inverter_losses.append(inverter_step(inverter, inverter_opt, d, targets, mask, table, cfg.inverter_steps))
        adv = adversarial_term(inverter, d, targets, mask, table, cfg.strength)
        task = causal_lm_loss(tail(trunk(d, mask, positions), mask, positions), labels)
        (task + adv).backward()
        for o in (opt, adapter_opt):
            o.step()
            o.zero_grad(set_to_none=True)
        inverter_opt.zero_grad(set_to_none=True)  # the adversarial term never reaches the inverter
        task_losses.append(float(task.detach()))
    return task_losses, inverter_losses


def _mean(xs):
    return sum(xs) / len(xs)


def test_the_alternating_loop_raises_the_inverter_loss_while_the_task_loss_falls(tiny_dir):
    task, inv = _train(tiny_dir, strength=3.0)
    assert _mean(task[-5:]) < 0.7 * _mean(task[:5])  # the model still learns its task
    assert _mean(inv[-10:]) > 1.5 * min(inv[:10])  # ... while its own inverter does worse and worse
    # control: the same loop without the adversarial term lets the inverter keep improving
    task0, inv0 = _train(tiny_dir, strength=0.0)
    assert _mean(inv0[-10:]) < _mean(inv0[:10])
    assert _mean(inv[-10:]) > 2.0 * _mean(inv0[-10:])


def test_with_a_bottleneck_the_inverter_loss_rises_while_the_task_loss_falls(tiny_dir):
    # strength 1, not 3: through 16 of 64 dimensions lambda 3 wins outright on this task (the task
    # loss turns back up, towards uniform guessing, once the tokens' identity is gone)
    task, inv = _train(tiny_dir, strength=1.0, bottleneck=16)
    assert _mean(task[-5:]) < 0.7 * _mean(task[:5])  # the model still learns its task through k dims
    assert _mean(inv[-10:]) > 3.0 * min(inv[:10])  # ... while its own inverter does worse and worse
    task0, inv0 = _train(tiny_dir, strength=0.0, bottleneck=16)  # control: no adversary, it reads the cut
    assert _mean(inv0[-10:]) < 0.1
    assert _mean(inv[-10:]) > 3.0 * _mean(inv0[-10:])


def test_the_adversarial_term_trains_the_adapter_and_never_the_inverter():
    ids, mask, _ = _data(1)
    vocab = SiloVocabulary(ids, VOCAB)
    targets = vocab.targets(ids, mask)
    table = torch.randn(len(vocab.ids), 64, generator=torch.Generator().manual_seed(1))
    hidden = table[targets.clamp_min(0)] + 0.3 * torch.randn(*ids.shape, 64)  # a readable cut
    adapter, inverter = PrivacyAdapter(64, 4), SiloInverter(64)
    cap = math.log(len(vocab.ids))
    adv = adversarial_term(inverter, defend(adapter, hidden, mask, None, 0.0, None), targets, mask, table, 2.0)
    adv.backward()
    assert -2.0 * cap < float(adv.detach()) < 0 and all(p.grad is None for p in inverter.parameters())
    assert float(adapter.gain.grad.abs().sum()) > 0 and float(adapter.up.grad.abs().sum()) > 0
    # an inverter confidently wrong beyond uniform guessing is capped there: nothing more to gain
    with torch.no_grad():
        inverter.scale.fill_(1000.0)
    noise = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(2))
    capped = adversarial_term(inverter, defend(adapter, noise, mask, None, 0.0, None), targets, mask, table, 2.0)
    assert float(capped.detach()) == pytest.approx(-2.0 * cap)


def test_the_adapter_starts_as_the_identity_and_strength_zero_is_off():
    hidden = torch.randn(2, 5, 32)
    assert torch.equal(PrivacyAdapter(32, 4)(hidden), hidden)
    assert not PrivacyAdapterConfig().enabled and not PrivacyAdapterConfig(strength=0.0).enabled
    assert PrivacyAdapterConfig(strength=0.5).enabled
    ids, mask, _ = _data(2)
    vocab = SiloVocabulary(ids, VOCAB)
    adv = adversarial_term(SiloInverter(32), hidden.new_zeros(*ids.shape, 32).normal_(), vocab.targets(ids, mask),
                           mask, torch.randn(len(vocab.ids), 32), 0.0)
    assert float(adv) == 0.0
    # with no adapter, defend is exactly protect_cut: real tokens untouched, pads zeroed
    out = defend(None, torch.ones(*ids.shape, 8), mask, None, 0.0, None)
    assert torch.equal(out[mask.bool()], torch.ones(int(mask.sum()), 8)) and not out[~mask.bool()].any()


def test_warmup_step_makes_the_inverter_learn_and_keeps_the_adapter_near_identity():
    ids, mask, _ = _data(3)
    vocab = SiloVocabulary(ids, VOCAB)
    table = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(0))[vocab.ids]
    hidden = table[vocab.targets(ids, mask).clamp_min(0)] + 0.1 * torch.randn(*ids.shape, 32)
    cfg = PrivacyAdapterConfig(strength=0.1, distortion=10.0)
    adapter, inverter = PrivacyAdapter(32, 4), SiloInverter(32)
    a_opt = torch.optim.Adam(adapter.parameters(), lr=cfg.adapter_lr)
    i_opt = torch.optim.Adam(inverter.parameters(), lr=cfg.inverter_lr)
    results = [warmup_step(adapter, a_opt, inverter, i_opt, hidden, vocab.targets(ids, mask), mask, table, cfg,
                           None, 0.0, None) for _ in range(30)]
    assert results[-1][0] < results[0][0]  # the inverter learned (hidden is a noisy lookup)
    assert 0.0 < results[-1][1] < 0.1  # the adapter moved, but the distortion weight kept it close


@pytest.mark.parametrize("kwargs", [dict(strength=-1.0), dict(strength=math.nan), dict(rank=0),
                                    dict(inverter_lr=0.0), dict(inverter_steps=0), dict(adapter_lr=-1.0),
                                    dict(warmup_steps=-1), dict(distortion=-0.5), dict(strenght=1.0)])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValidationError):
        PrivacyAdapterConfig(**kwargs)


def test_bad_calls_raise_clear_errors():
    ids, mask, _ = _data(4)
    vocab = SiloVocabulary(ids, VOCAB)
    table = torch.randn(len(vocab.ids), 16)
    inverter = SiloInverter(16)
    with pytest.raises(ValueError, match="rank must be in 1..16"):
        PrivacyAdapter(16, rank=17)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        adversarial_term(inverter, torch.randn(*ids.shape, 16), vocab.targets(ids, mask), mask, table, math.nan)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        inverter_step(inverter, torch.optim.Adam(inverter.parameters()), torch.randn(*ids.shape, 16),
                      vocab.targets(ids, mask), mask, table, steps=0)
    with pytest.raises(ValueError, match="matching targets"):
        inversion_loss(inverter, torch.randn(2, 3, 16), vocab.targets(ids, mask), mask, table)
    with pytest.raises(ValueError, match="no real tokens"):
        empty = torch.zeros_like(mask)
        inversion_loss(inverter, torch.randn(*ids.shape, 16), vocab.targets(ids, empty), empty, table)
    with pytest.raises(ValueError, match="within 0..259"):
        SiloVocabulary(torch.tensor([3, 260]), VOCAB)
    with pytest.raises(ValueError, match="does not match input_ids"):
        vocab.targets(ids, mask[:, :3])
