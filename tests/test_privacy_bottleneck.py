"""shared/model/privacy_bottleneck.py and its audit rows on a tiny model: the output's rank is at most
k, warm-up trains it, the audit attacks the bottlenecked head, and bad settings are clear errors.
(The adversarial loop with a bottleneck, inverter loss up while task loss falls, is in
test_privacy_adapter.py: the same loop as the adapter's.)"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from shared.data.tokenizer import byte_tokenizer
from shared.model.privacy_adapter import (
    PrivacyAdapter,
    PrivacyAdapterConfig,
    SiloInverter,
    SiloVocabulary,
    defend,
    privacy_module,
    warmup_step,
)
from shared.model.privacy_bottleneck import PrivacyBottleneck
from shared.model.tiny_models import make_tiny_model_dir
from splitfed.audit.attacks import Defense
from splitfed.audit.cut import TrainedHead
from splitfed.audit.defended import DefendConfig, plan_rows
from splitfed.audit.utility import FinetuneSpec, finetune
from splitfed.cli import main

VOCAB = 260  # make_tiny_model_dir's default
FAST = ["--victims", "4", "--max-tokens", "16", "--shadow", "16", "--learned-steps", "4", "--optim-steps", "3",
        "--finetune-steps", "2", "--finetune-batch", "2", "--eval-examples", "2", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("bottleneck"), "llama")
    byte_tokenizer().save_pretrained(path)
    return path


def _rank(out: torch.Tensor) -> int:
    # fp32 products leave ~1e-7 relative residue in the discarded directions: not rank
    return int(torch.linalg.matrix_rank(out.detach().reshape(-1, out.shape[-1]).double(), rtol=1e-5))


def test_the_output_has_rank_at_most_k_before_and_after_training_and_init():
    hidden = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 16, dtype=torch.long)
    neck = PrivacyBottleneck(64, 8)
    assert _rank(neck(hidden)) == 8 and _rank(hidden) == 64
    kept = neck.init_principal(hidden, mask)
    assert 8 / 64 < kept < 1.0 and _rank(neck(hidden)) == 8  # top-8 of isotropic noise: a bit above 8/64
    opt = torch.optim.Adam(neck.parameters(), lr=0.1)
    for _ in range(3):  # any D and U, trained or not: the map factors through k dimensions
        neck(hidden).pow(3).sum().backward()
        opt.step()
        opt.zero_grad()
    assert _rank(neck(hidden)) <= 8
    assert _rank(defend(neck, hidden, mask, 3.0, 0.0, None)) <= 8  # clipping scales tokens: stays in it


def test_principal_init_keeps_data_that_lies_in_k_dimensions_whole():
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=gen))[0]
    hidden = (torch.randn(3, 10, 4, generator=gen) @ basis.T) + 5.0 * basis[:, 0]  # a large mean, as h1 has
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0
    neck = PrivacyBottleneck(32, 4)
    assert neck.init_principal(hidden, mask) == pytest.approx(1.0)
    assert torch.allclose(neck(hidden), hidden, atol=1e-4)


def test_warmup_step_trains_a_bottleneck_like_the_adapter():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 28, (8, 16), generator=gen)
    mask = torch.ones_like(ids)
    vocab = SiloVocabulary(ids, VOCAB)
    table = torch.randn(VOCAB, 32, generator=gen)[vocab.ids]
    hidden = table[vocab.targets(ids, mask)] + 0.1 * torch.randn(8, 16, 32, generator=gen)
    cfg = PrivacyAdapterConfig(strength=0.1, distortion=10.0, bottleneck=8)
    neck, inverter = privacy_module(cfg, 32), SiloInverter(32)
    neck.init_principal(hidden, mask)
    before = neck.down.detach().clone()
    n_opt = torch.optim.Adam(neck.parameters(), lr=cfg.adapter_lr)
    i_opt = torch.optim.Adam(inverter.parameters(), lr=cfg.inverter_lr)
    results = [warmup_step(neck, n_opt, inverter, i_opt, hidden, vocab.targets(ids, mask), mask, table, cfg,
                           None, 0.0, None) for _ in range(10)]
    assert not torch.equal(neck.down, before)  # it trained
    assert 0.0 < results[-1][1] < 1.0  # distortion: the energy outside the subspace, relative


def test_a_bottleneck_is_on_at_strength_zero_and_the_adapter_is_unchanged():
    assert PrivacyAdapterConfig(bottleneck=8).enabled and Defense(learned=PrivacyAdapterConfig(bottleneck=8)).adapted
    assert not PrivacyAdapterConfig().enabled  # the default is still no defense at all
    assert isinstance(privacy_module(PrivacyAdapterConfig(strength=1.0, rank=4), 32), PrivacyAdapter)
    assert isinstance(privacy_module(PrivacyAdapterConfig(bottleneck=4), 32), PrivacyBottleneck)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"bottleneck rank must be in 1..15 \(below the hidden size\)"):
        PrivacyBottleneck(16, 16)
    with pytest.raises(ValueError, match="bottleneck rank must be in"):
        PrivacyBottleneck(16, 0)
    with pytest.raises(ValidationError):
        PrivacyAdapterConfig(bottleneck=-1)
    neck = PrivacyBottleneck(16, 4)
    with pytest.raises(ValueError, match="3 real tokens cannot give 4 principal directions"):
        neck.init_principal(torch.randn(1, 3, 16), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"hidden must be \[batch, tokens, 16\]"):
        neck.init_principal(torch.randn(1, 3, 8), torch.ones(1, 3))
    with pytest.raises(ValueError, match="does not match hidden"):
        neck.init_principal(torch.randn(1, 3, 16), torch.ones(1, 4))
    with pytest.raises(ValueError, match="bottleneck strengths must be >= 0"):
        plan_rows(DefendConfig(bottleneck_ranks=(8,), bottleneck_strengths=(-1.0,)))


def test_plan_rows_puts_adversarial_bottleneck_rows_before_their_controls():
    cfg = DefendConfig(cuts=(), sigmas=(), strengths=(), learned_sigma=0.5, bottleneck_ranks=(8, 32),
                       bottleneck_strengths=(3.0, 0.0))
    assert [(r["label"], r["bottleneck"]) for r in plan_rows(cfg)] == [
        ("1 block + bottleneck 8 + learned 3 + clip + noise 0.5", 8),
        ("1 block + bottleneck 32 + learned 3 + clip + noise 0.5", 32),
        ("1 block + bottleneck 8 + no adversary + clip + noise 0.5", 8),
        ("1 block + bottleneck 32 + no adversary + clip + noise 0.5", 32)]
    assert plan_rows(DefendConfig(cuts=(1,), bottleneck_strengths=())) == plan_rows(DefendConfig(cuts=(1,)))


def test_the_audit_fine_tunes_a_bottleneck_and_attacks_that_head(tiny_dir):
    defense = Defense(learned=PrivacyAdapterConfig(strength=1.0, bottleneck=8, warmup_steps=2))
    _, pipe = finetune(tiny_dir, 1, defense, FinetuneSpec(steps=2, batch_size=2, max_length=48, eval_examples=2))
    assert isinstance(pipe.adapter, PrivacyBottleneck) and 0.0 < pipe.kept_energy < 1.0
    assert len(pipe.inverter_losses) == 2 and len(pipe.warmup_losses) == 2
    ids = torch.randint(4, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    cut = TrainedHead(pipe.head, pipe.adapter).cut(ids, torch.ones_like(ids), 1)  # the retrained attacker's copy
    assert _rank(cut) <= 8


def test_defend_cli_runs_bottleneck_rows_and_refuses_bad_ranks(tiny_dir, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["audit", "defend", "--model", str(tiny_dir), *FAST, "--cuts", "1",
                                       "--sigma", "", "--strengths", "", "--bottleneck-ranks", "8",
                                       "--bottleneck-strengths", "0", "--learned-sigma", "0.1",
                                       "--no-public-attack", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "defend.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["none", "bottleneck"]
    assert rows[1]["bottleneck"] == 8 and rows[1]["strength"] == 0.0 and 0 < rows[1]["bottleneck_kept_energy"] < 1
    assert (out / "defend.png").exists()
    for args, message in ((["--bottleneck-ranks", "64"], "below the hidden size 64"),
                          (["--bottleneck-ranks", "0"], "expected bottleneck ranks >= 1"),
                          (["--bottleneck-ranks", "8", "--bottleneck-strengths", "-1"], "every strength must be >= 0")):
        result = CliRunner().invoke(main, ["audit", "defend", "--model", str(tiny_dir), *FAST, "--cuts", "",
                                           "--sigma", "", "--strengths", "", *args])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
