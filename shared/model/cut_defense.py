"""Silo-side defense of the cut activations: per-token L2 clipping, then Gaussian noise.

Encryption hides the cut activations from the broker and from peer silos, not from the trunk
operator, who must compute on them. What the head sends can be inverted back to the silo's tokens
(`splitfed audit invert` measures how well). This module blurs it before it leaves the silo:

    h1 = head(ids, mask, positions)
    h1 = protect_cut(h1, mask, clip_norm, sigma, generator)   # here: on the head output ...
    frame = seal(h1)                                           # ... before sealing, never after

1. padded positions are zeroed: nothing real attends to them (right padding, causal attention) and
   their labels are ignored, so they only ever leak (a pad's activation mixes the tokens before it);
2. every real token's vector is scaled down to L2 norm <= ``clip_norm`` (None: no clipping), which
   bounds what one token can say and fixes the scale the noise is measured against;
3. i.i.d. Gaussian noise with standard deviation ``sigma`` per coordinate is added to real tokens
   (noise norm ~ sigma * sqrt(hidden_size); sigma = 0: no noise).

Everything is plain autograd (a scale and an addition), so the backward pass through the defense
is the exact gradient and training through it needs nothing special: dL/dh1 from the trunk flows
back through the clipping scale into the head. The noise comes from the caller's generator only
(drawn on the CPU in fp32, then moved), so a run is reproducible across devices and dtypes; seed a
fresh generator per step with `noise_generator` so no two steps reuse a draw. The seed must stay
secret to the silo (never the run's shared seed): whoever knows it can subtract the noise.

Pure functions: no state, no global RNG, no role imports.
"""

from __future__ import annotations

import hashlib
import secrets

import torch
from pydantic import BaseModel, ConfigDict, Field

# A norm below this counts as zero: the clipping scale must not divide by it.
_NORM_FLOOR = 1e-12


class CutDefenseConfig(BaseModel):
    """The silo's defense setting. ``enabled`` is False for the defaults (clip None, sigma 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_norm: float | None = Field(None, gt=0.0, description="per-token L2 bound; None: no clipping")
    sigma: float = Field(0.0, ge=0.0, description="Gaussian noise std per coordinate; 0: no noise")
    # Secret to the silo: a trunk that knows the seed regenerates every draw and subtracts it. So never
    # the run's shared `seed` (the trunk has it); by default a fresh random one per silo process.
    seed: int = Field(default_factory=lambda: secrets.randbits(63), ge=0,
                      description="the silo's SECRET noise seed, mixed with each step's identity")

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None or self.sigma > 0.0


def noise_generator(seed: int, *step_identity: int | str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the step's identity (e.g. silo index, round, step).

    A hash, not a sum: (seed 1, step 0) and (seed 0, step 1) must not share noise. Stable across
    processes and machines (python's hash() is salted per process).
    """
    key = "/".join(str(part) for part in ("splitfed-cut-defense", seed, *step_identity))
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def clip_token_norms(hidden: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each token vector (last dim) down to L2 norm <= ``clip_norm``; shorter ones are unchanged."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    # half precision norms overflow or round badly: measure in fp32 at least (fp64 stays fp64)
    wide = hidden if hidden.dtype in (torch.float32, torch.float64) else hidden.float()
    norms = wide.norm(dim=-1, keepdim=True).clamp_min(_NORM_FLOOR)
    scale = (clip_norm / norms).clamp(max=1.0)
    return hidden * scale.to(hidden.dtype)


def protect_cut(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    clip_norm: float | None,
    sigma: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The defended cut activations: pads zeroed, real tokens clipped to ``clip_norm``, plus N(0, sigma^2).

    ``hidden`` [B, T, H] is the head's output, ``attention_mask`` [B, T] its 1/0 padding mask. With
    clip_norm None and sigma 0 the real tokens pass through unchanged. ``generator`` is required when
    sigma > 0 (reproducible noise or none at all: never the global RNG).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [batch, tokens, hidden], got shape {tuple(hidden.shape)}")
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match hidden "
                         f"{tuple(hidden.shape[:2])}")
    if not sigma >= 0:  # also rejects NaN
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma > 0 and generator is None:
        raise ValueError("sigma > 0 needs a torch.Generator (see noise_generator)")
    real = attention_mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
    out = hidden * real
    if clip_norm is not None:
        out = clip_token_norms(out, clip_norm)
    if sigma > 0:
        noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32)
        out = out + (noise * sigma).to(device=hidden.device, dtype=hidden.dtype) * real
    return out


def protect_cut_with(config: CutDefenseConfig, hidden: torch.Tensor, attention_mask: torch.Tensor,
                     *step_identity: int | str) -> torch.Tensor:
    """`protect_cut` from a config, with the noise seeded from ``config.seed`` and the step's identity."""
    generator = noise_generator(config.seed, *step_identity) if config.sigma > 0 else None
    return protect_cut(hidden, attention_mask, config.clip_norm, config.sigma, generator)
