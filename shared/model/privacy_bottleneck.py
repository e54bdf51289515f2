"""A rank-k bottleneck on the silo's cut: h1' = U(D(h1)), D: H -> k, U: k -> H.

The residual privacy adapter (privacy_adapter.PrivacyAdapter) starts as the identity and, under
any distortion penalty that keeps the model useful, stays near it: it is an invertible map the
retrained attacker knows, so it removes nothing. A bottleneck is not invertible: everything the
trunk sees lies in a k-dimensional subspace (no bias, so the outputs' rank is <= k), and whatever
of h1 lies outside it is gone before the clip and noise, whoever knows D and U. It is trained like
the adapter (a drop-in for it in `defend`, `warmup_step` and the audit): task loss minus lambda x the
silo inverter's loss, alternating, after a head-only warm-up under the distortion penalty.

Initialisation: D = V_k, U = V_k^T with V_k the top-k right singular vectors of h1 over the real
tokens of the silo's own data (uncentred, so the large mean direction of h1 is kept first): the
orthogonal projection that loses the least of h1, the best start for the task; the adversarial
term then moves the subspace away from token identity. Without data: a random orthonormal basis.

U stays on the silo here, so nothing changes on the wire or the trunk. It could instead be folded
into the trunk's first block (the silo sends D(h1), k/H of today's bytes); that is not built.
Pure module: no role imports.
"""

from __future__ import annotations

import torch
from torch import nn


class PrivacyBottleneck(nn.Module):
    """h -> (h @ down) @ up per token; ``down`` [H, k], ``up`` [k, H]."""

    def __init__(self, hidden_size: int, rank: int, seed: int = 0):
        super().__init__()
        if not 1 <= rank < hidden_size:
            # rank H would be a full-rank linear map: no bottleneck at all
            raise ValueError(f"bottleneck rank must be in 1..{hidden_size - 1} (below the hidden size), got {rank}")
        gen = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(hidden_size, rank, generator=gen))
        self.down = nn.Parameter(basis.clone())
        self.up = nn.Parameter(basis.T.clone())

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.down) @ self.up

    @torch.no_grad()
    def init_principal(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> float:
        """Set D, U to the projection on the top-k principal directions of ``hidden``'s real tokens.

        Returns the fraction of their energy (sum of squares) the projection keeps.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.down.shape[0]:
            raise ValueError(f"hidden must be [batch, tokens, {self.down.shape[0]}], got {tuple(hidden.shape)}")
        if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match hidden "
                             f"{tuple(hidden.shape[:2])}")
        real = hidden[attention_mask.bool()].float()
        if real.shape[0] < self.rank:
            raise ValueError(f"{real.shape[0]} real tokens cannot give {self.rank} principal directions")
        _, singular, vh = torch.linalg.svd(real, full_matrices=False)
        basis = vh[:self.rank].T
        self.down.copy_(basis)
        self.up.copy_(basis.T)
        return float(singular[:self.rank].pow(2).sum() / singular.pow(2).sum().clamp_min(1e-12))
