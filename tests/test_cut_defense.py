"""shared/model/cut_defense.py: clipping bounds, identity when off, seeded noise, gradients, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from shared.model.cut_defense import (
    CutDefenseConfig,
    clip_token_norms,
    noise_generator,
    protect_cut,
    protect_cut_with,
)


def _hidden(seed: int = 0, shape=(3, 7, 16), scale: float = 5.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _mask(batch: int = 3, tokens: int = 7) -> torch.Tensor:
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, 4:] = 0  # one padded row
    return mask


def test_clipping_bounds_every_token_norm_and_keeps_short_ones():
    hidden = _hidden()
    hidden[0, 0] *= 1e-3  # a token already inside the bound
    out = protect_cut(hidden, torch.ones(3, 7, dtype=torch.long), clip_norm=2.0, sigma=0.0, generator=None)
    norms = out.norm(dim=-1)
    assert float(norms.max()) <= 2.0 + 1e-5
    assert torch.equal(out[0, 0], hidden[0, 0])
    long_ones = hidden.norm(dim=-1) > 2.0
    assert torch.allclose(norms[long_ones], torch.full_like(norms[long_ones], 2.0), rtol=0, atol=1e-5)
    # direction is kept: clipping only scales
    cos = torch.nn.functional.cosine_similarity(out, hidden, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), rtol=0, atol=1e-5)


def test_no_noise_and_a_large_clip_is_the_identity_on_real_tokens_and_zeroes_pads():
    hidden, mask = _hidden(), _mask()
    for clip in (None, 1e6):
        out = protect_cut(hidden, mask, clip_norm=clip, sigma=0.0, generator=None)
        real = mask.bool()
        assert torch.equal(out[real], hidden[real])
        assert torch.count_nonzero(out[~real]) == 0


def test_seeded_noise_is_reproducible_fresh_per_step_and_has_sigma():
    hidden, mask = _hidden(shape=(4, 32, 64)), torch.ones(4, 32, dtype=torch.long)
    a = protect_cut(hidden, mask, None, 0.5, noise_generator(7, "silo-0", 3))
    b = protect_cut(hidden, mask, None, 0.5, noise_generator(7, "silo-0", 3))
    c = protect_cut(hidden, mask, None, 0.5, noise_generator(7, "silo-0", 4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    noise = a - hidden
    assert abs(float(noise.std()) - 0.5) < 0.02
    assert abs(float(noise.mean())) < 0.02
    # hashed, not summed: (seed 1, step 0) and (seed 0, step 1) differ
    assert not torch.equal(torch.randn(5, generator=noise_generator(1, 0)), torch.randn(5, generator=noise_generator(0, 1)))


def test_the_defense_is_differentiable_with_the_exact_clipping_gradient():
    hidden = _hidden(shape=(2, 3, 8), scale=3.0).requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.long)
    weights = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    out = protect_cut(hidden, mask, 1.5, 0.1, noise_generator(0, 0))
    (out * weights).sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert float(hidden.grad.abs().sum()) > 0
    # double-precision check of the clip's own Jacobian (noise is additive: gradient 1)
    x = _hidden(shape=(1, 2, 5), scale=3.0).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: clip_token_norms(t, 1.5), (x,))


def test_pads_get_no_gradient_and_no_noise():
    hidden, mask = _hidden().requires_grad_(True), _mask()
    out = protect_cut(hidden, mask, 2.0, 1.0, noise_generator(0, 0))
    assert torch.count_nonzero(out[~mask.bool()]) == 0
    out.sum().backward()
    assert torch.count_nonzero(hidden.grad[~mask.bool()]) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(clip_norm=1.0, sigma=-0.1), "sigma must be >= 0"),
    (dict(clip_norm=1.0, sigma=math.nan), "sigma must be >= 0"),
    (dict(clip_norm=0.0, sigma=0.0), "clip_norm must be > 0"),
    (dict(clip_norm=None, sigma=0.5), "needs a torch.Generator"),
])
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        protect_cut(_hidden(), torch.ones(3, 7, dtype=torch.long), generator=None, **kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="attention_mask shape"):
        protect_cut(_hidden(), torch.ones(3, 6, dtype=torch.long), 1.0, 0.0, None)
    with pytest.raises(ValueError, match="batch, tokens, hidden"):
        protect_cut(torch.zeros(7, 16), torch.ones(7, dtype=torch.long), 1.0, 0.0, None)


def test_config_validates_and_drives_the_call():
    assert not CutDefenseConfig().enabled
    assert CutDefenseConfig().seed != CutDefenseConfig().seed  # a fresh secret seed unless given
    with pytest.raises(ValidationError):
        CutDefenseConfig(sigma=-1.0)
    with pytest.raises(ValidationError):
        CutDefenseConfig(clip_norm=0.0)
    with pytest.raises(ValidationError):
        CutDefenseConfig(sigma=0.1, typo=1)
    cfg = CutDefenseConfig(clip_norm=2.0, sigma=0.3, seed=5)
    hidden, mask = _hidden(), _mask()
    expected = protect_cut(hidden, mask, 2.0, 0.3, noise_generator(5, "silo-a", 0, 9))
    assert torch.equal(protect_cut_with(cfg, hidden, mask, "silo-a", 0, 9), expected)
