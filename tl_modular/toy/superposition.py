"""Toy Models of Superposition with a privileged hidden basis: ground truth for polysemanticity.

n sparse features ``x`` (each present with probability ``p``, value uniform in [0, 1]) pass
through ``h = ReLU(x W + b)`` (``d_hidden`` units) and back out through ``ReLU(h W_out + b_out)``,
trained to reconstruct ``x`` (Elhage et al., 2022). The ReLU on the hidden layer gives its units
meaning (without it the hidden space can be rotated freely). With ``d_hidden < n`` the model packs
features into shared units (polysemantic); the monosemantic control (``d_hidden = n``) starts
from the identity and is trained with an L1 penalty on W, and :meth:`Superposition.unit_features`
checks it against the known features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float

from tl_modular._stats import effective_number


@dataclass
class Superposition:
    """A trained toy model; ``W: [n_features, d_hidden]`` (rows: features' hidden images)."""

    W: Float[torch.Tensor, "n_features d_hidden"]
    b: Float[torch.Tensor, " d_hidden"]
    W_out: Float[torch.Tensor, "d_hidden n_features"]
    b_out: Float[torch.Tensor, " n_features"]
    sparsity: float
    loss: float

    @property
    def n_features(self) -> int:
        return self.W.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> Float[torch.Tensor, "n n_features"]:
        """Sparse feature vectors: each feature on with probability ``sparsity``, value in [0, 1]."""
        return _sample(n, self.n_features, self.sparsity, generator)

    def hidden(self, x: torch.Tensor) -> Float[torch.Tensor, "n d_hidden"]:
        return torch.relu(x @ self.W + self.b)

    def feature_directions(self) -> tuple[Float[torch.Tensor, "n_features d_hidden"], torch.Tensor]:
        """Each feature's hidden direction (unit norm; the hidden change when it alone turns on at
        full strength) and whether the model represents it (norm ≥ 20% of the largest)."""
        d = torch.relu(self.W + self.b) - torch.relu(self.b)
        norm = d.norm(dim=1)
        return d / norm[:, None].clamp_min(1e-12), norm >= 0.2 * norm.max()

    def unit_features(self) -> torch.Tensor:
        """Known effective number of features per hidden unit: exp(entropy) over features of
        how much each one, alone at full strength, moves the unit (nan for a unit none moves)."""
        d = (torch.relu(self.W + self.b) - torch.relu(self.b)).abs()
        return effective_number(d.T)


def _sample(n: int, n_features: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, n_features, generator=generator) * (torch.rand(n, n_features, generator=generator) < p)


def train_superposition(n_features: int = 12, d_hidden: int = 5, *, sparsity: float = 0.05,
                        monosemantic: bool = False, steps: int = 4000, batch_size: int = 1024, lr: float = 3e-3,
                        weight_l1: float = 0.01, seed: int = 0) -> Superposition:
    """Train a toy model of superposition (see the module docs).

    ``monosemantic=True`` is the control: it needs ``d_hidden == n_features``, starts W at the
    identity and adds ``weight_l1`` × mean |W| to the loss, so every unit keeps one feature.

    >>> poly = tlm.toy.train_superposition(12, 5)                    # doctest: +SKIP
    >>> mono = tlm.toy.train_superposition(12, 12, monosemantic=True) # doctest: +SKIP
    """
    if n_features < 1 or d_hidden < 1:
        raise ValueError(f"n_features and d_hidden must be positive, got {n_features}, {d_hidden}")
    if monosemantic and d_hidden != n_features:
        raise ValueError(f"the monosemantic control needs d_hidden == n_features, got {d_hidden} vs {n_features}")
    if not 0 < sparsity <= 1:
        raise ValueError(f"sparsity is a probability in (0, 1], got {sparsity}")
    gen = torch.Generator().manual_seed(seed)
    if monosemantic:
        W = torch.eye(n_features) + 0.05 * torch.randn(n_features, d_hidden, generator=gen)
        W_out = W.T.clone()
    else:
        W = torch.randn(n_features, d_hidden, generator=gen) / math.sqrt(d_hidden)
        W_out = torch.randn(d_hidden, n_features, generator=gen) / math.sqrt(d_hidden)
    params = [torch.nn.Parameter(t) for t in (W, torch.zeros(d_hidden), W_out, torch.zeros(n_features))]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        x = _sample(batch_size, n_features, sparsity, gen)
        h = torch.relu(x @ params[0] + params[1])
        y = torch.relu(h @ params[2] + params[3])
        loss = ((y - x) ** 2).mean()
        total = loss + (weight_l1 * params[0].abs().mean() if monosemantic else 0.0)
        opt.zero_grad()
        total.backward()
        opt.step()
    W, b, W_out, b_out = (p.detach() for p in params)
    return Superposition(W, b, W_out, b_out, sparsity, float(loss))
