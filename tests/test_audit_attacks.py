"""The inversion attacks of `splitfed audit` on tiny models: they work where they must, and run."""

from __future__ import annotations

import pytest
import torch

from shared.model.cut_defense import noise_generator
from shared.model.tiny_models import make_tiny_model_dir
from splitfed.audit.attacks import Defense, LearnedInverter, nearest_embedding_attack, optimization_attack
from splitfed.audit.cut import HeadBlocks
from splitfed.audit.metrics import token_recovery


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> HeadBlocks:
    return HeadBlocks(make_tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama"), max_blocks=2)


def _ids(seed: int, rows: int = 6, tokens: int = 24, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (rows, tokens), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, tokens // 2:] = 0  # one right-padded row
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nearest_embedding_inverts_an_embeddings_only_cut(tmp_path, family):
    head = HeadBlocks(make_tiny_model_dir(tmp_path, family), max_blocks=1)
    ids, mask = _ids(0)
    guess = nearest_embedding_attack(head.cut(ids, mask, 0), mask, head)
    assert guess.shape == ids.shape
    assert token_recovery(guess, ids, mask) > 90.0


def test_nearest_embedding_is_blind_to_clipping_but_not_to_heavy_noise(llama):
    ids, mask = _ids(1)
    clean = llama.cut(ids, mask, 0)
    clipped = Defense(clip_norm=0.05).apply(clean, mask, noise_generator(0, 0))
    assert token_recovery(nearest_embedding_attack(clipped, mask, llama), ids, mask) > 90.0
    noisy = Defense(clip_norm=0.05, sigma=1.0).apply(clean, mask, noise_generator(0, 1))
    assert token_recovery(nearest_embedding_attack(noisy, mask, llama), ids, mask) < 20.0


def test_a_head_block_hides_tokens_from_the_nearest_embedding_attack_of_the_tiny_model(llama):
    ids, mask = _ids(2)
    at_zero = token_recovery(nearest_embedding_attack(llama.cut(ids, mask, 0), mask, llama), ids, mask)
    at_two = token_recovery(nearest_embedding_attack(llama.cut(ids, mask, 2), mask, llama), ids, mask)
    assert at_two < at_zero


def test_optimization_attack_lowers_its_loss_and_returns_tokens(llama):
    ids, mask = _ids(3, rows=3, tokens=12)
    losses = []
    guess = optimization_attack(llama.cut(ids, mask, 1), mask, llama, 1, Defense(), steps=25, lr=0.1,
                                on_step=lambda step, steps, loss: losses.append(loss))
    assert len(losses) == 25 and losses[-1] < 0.8 * losses[0]
    assert guess.shape == ids.shape and guess.dtype == torch.long
    assert int(guess.min()) >= 0 and int(guess.max()) < llama.token_embeddings.shape[0]
    assert 0.0 <= token_recovery(guess, ids, mask) <= 100.0


def test_optimization_attack_undoes_a_clipped_embeddings_only_cut(llama):
    ids, mask = _ids(4, rows=3, tokens=12)
    defense = Defense(clip_norm=0.05)
    observed = defense.apply(llama.cut(ids, mask, 0), mask, noise_generator(0, 0))
    guess = optimization_attack(observed, mask, llama, 0, defense, steps=60, lr=0.2)
    assert token_recovery(guess, ids, mask) > 90.0


def test_learned_attacker_trains_on_shadow_text_and_inverts_unseen_texts(llama):
    shadow_ids, shadow_mask = _ids(5, rows=48, tokens=24, vocab=40)  # a small vocabulary: learnable fast
    victim_ids, victim_mask = _ids(6, rows=6, tokens=24, vocab=40)
    losses = []
    inverter = LearnedInverter.train(llama.cut(shadow_ids, shadow_mask, 1), shadow_ids, shadow_mask, llama,
                                     Defense(), steps=60, on_step=lambda s, n, loss: losses.append(loss))
    assert losses[-1] < 0.5 * losses[0]
    guess = inverter(llama.cut(victim_ids, victim_mask, 1), victim_mask)
    assert guess.shape == victim_ids.shape
    assert set(guess.unique().tolist()) <= set(shadow_ids.unique().tolist())  # guesses are candidates
    assert token_recovery(guess, victim_ids, victim_mask) > 50.0


def test_learned_attacker_is_reproducible_from_its_seed(llama):
    ids, mask = _ids(7, rows=16, tokens=12, vocab=30)
    cut = llama.cut(ids, mask, 1)
    defense = Defense(clip_norm=1.0, sigma=0.05)
    a = LearnedInverter.train(cut, ids, mask, llama, defense, steps=5, seed=3)(cut, mask)
    b = LearnedInverter.train(cut, ids, mask, llama, defense, steps=5, seed=3)(cut, mask)
    assert torch.equal(a, b)


def test_a_cut_deeper_than_the_copy_is_refused(llama):
    ids, mask = _ids(8, rows=1, tokens=4)
    with pytest.raises(ValueError, match="holds 0..2"):
        llama.cut(ids, mask, 3)
