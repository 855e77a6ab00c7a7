"""Small statistics every stage shares: rank correlation, partition agreement, subspace angles,
k-means and the effective number of parts.

Each lives here once so that graphs, circuits, diffs, SAEs and the toy models score alike.

>>> spearman([1, 2, 3], [10, 30, 20])
0.5
>>> adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0])
1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float

__all__ = ["adjusted_rand_index", "effective_number", "kmeans", "principal_angles", "spearman"]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties get their average rank); nan when either side is constant.

    >>> round(spearman([1, 2, 3, 4], [1, 3, 2, 4]), 6)
    0.8
    """
    def ranks(x: Sequence[float]) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ranks over ties
            tie = x == v
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def adjusted_rand_index(a: Sequence[int], b: Sequence[int]) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie): 1 for the same partition, ~0 by chance.

    >>> adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 1])
    1.0
    """
    a, b = np.asarray(a), np.asarray(b)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    comb = lambda n: n * (n - 1) / 2  # noqa: E731
    index, rows, cols = comb(table).sum(), comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
    expected = rows * cols / comb(len(a)) if len(a) > 1 else 0.0
    top = (rows + cols) / 2
    return 1.0 if top == expected else float((index - expected) / (top - expected))


def principal_angles(qa: Float[torch.Tensor, "d_model ra"], qb: Float[torch.Tensor, "d_model rb"]) -> torch.Tensor:
    """Principal angles (radians, ascending) between the spans of two orthonormal bases.

    ``min(ra, rb)`` angles. Cosines and sines both come from SVDs and are combined by ``atan2``,
    which keeps small angles accurate (``arccos`` alone loses them below ~1e-4 rad).

    >>> principal_angles(torch.eye(3)[:, :1], torch.eye(3)[:, 1:]).tolist()
    [1.5707963267948966]
    """
    qa, qb = qa.double(), qb.double()
    if qa.shape[1] < qb.shape[1]:
        qa, qb = qb, qa
    if qb.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(0, 1)                   # descending
    sin = torch.linalg.svdvals(qb - qa @ (qa.T @ qb)).clamp(0, 1).flip(0)  # ascending
    return torch.atan2(sin, cos)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 100, restarts: int = 8) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, best of ``restarts`` by within-cluster sum of squares.

    Returns the cluster label of each row of ``x``. (scipy's ``kmeans2`` seeds differently, so it would
    change every seeded result that uses this one.)

    >>> kmeans(np.array([[0.0], [0.1], [5.0], [5.1]]), 2, np.random.default_rng(0)).tolist() in ([0, 0, 1, 1],
    ...                                                                                          [1, 1, 0, 0])
    True
    """
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
            centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
        centres = np.array(centres)
        for _ in range(iters):
            labels = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.array([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        cost = ((x - centres[labels]) ** 2).sum()
        if cost < best_cost:
            best, best_cost = labels, cost
    return best


def effective_number(weights: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row's normalized non-negative weights (nan for an all-zero row).

    >>> effective_number(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])).tolist()
    [2.0, nan]
    """
    total = weights.sum(-1, keepdim=True)
    p = weights / total
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return torch.where(total.squeeze(-1) > 0, h.exp(), torch.full_like(h, float("nan")))
