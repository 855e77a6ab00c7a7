"""How faithful a compression is: CE loss recovered and KL to the clean model, across budgets.

>>> comp.fidelity(model, tokens)                          # doctest: +SKIP
{'clean_loss': 2.31, 'compressed_loss': 2.35, 'ablated_loss': 5.2, 'loss_recovered': 0.986, 'kl': 0.02, ...}
>>> rank_fidelity_curve(model, comp, tokens, budgets=[50, 100, 200])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

__all__ = ["fidelity", "rank_fidelity_curve"]


@torch.no_grad()
def _logprobs(model: Any, tokens: torch.Tensor, batch_size: int, mask: torch.Tensor | None) -> list[torch.Tensor]:
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        kwargs = {} if mask is None else {"attention_mask": mask[start:start + batch_size]}
        logits = model(tokens[start:start + batch_size], **kwargs)
        out.append(logits[:, :-1].float().log_softmax(-1))
    return out


def _ce(logprobs: list[torch.Tensor], tokens: torch.Tensor, weights: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for i, lp in enumerate(logprobs):
        nxt = tokens[i * batch_size:(i + 1) * batch_size, 1:]
        w = weights[i * batch_size:(i + 1) * batch_size]
        total += float((-lp.gather(-1, nxt[..., None])[..., 0] * w).sum())
    return total / float(weights.sum())


def fidelity(model: Any, comp: Any, tokens: Int[torch.Tensor, "batch pos"], *, batch_size: int = 32,
             attention_mask: torch.Tensor | None = None, channels: Sequence[str] | None = None) -> dict[str, float]:
    """CE loss of the clean model, of the compressed one, and of the model with every compressed
    channel mean-ablated; ``loss_recovered = (ablated - compressed) / (ablated - clean)``; the
    mean KL divergence from the clean to the compressed next-token distribution. Predictions
    of padded positions are excluded."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (sequences per forward pass), got {batch_size!r}")
    tokens = tokens.to(model.cfg.device)
    weights = torch.ones(tokens[:, 1:].shape, device=tokens.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(tokens.device)
        weights = weights * attention_mask[:, 1:]
    clean = _logprobs(model, tokens, batch_size, attention_mask)
    with comp.applied(model, channels):
        compressed = _logprobs(model, tokens, batch_size, attention_mask)
    with comp.truncated(rank=0).applied(model, channels):
        ablated = _logprobs(model, tokens, batch_size, attention_mask)
    losses = {k: _ce(v, tokens, weights, batch_size) for k, v in
              (("clean_loss", clean), ("compressed_loss", compressed), ("ablated_loss", ablated))}
    kl = sum(float(((c.exp() * (c - q)).sum(-1) * weights[i * batch_size:(i + 1) * batch_size]).sum())
             for i, (c, q) in enumerate(zip(clean, compressed, strict=True))) / float(weights.sum())
    gap = losses["ablated_loss"] - losses["clean_loss"]
    recovered = (losses["ablated_loss"] - losses["compressed_loss"]) / gap if gap != 0 else float("nan")
    return {**losses, "loss_recovered": recovered, "kl": kl, "dimensions": comp.total_rank,
            "max_dimensions": comp.max_total_rank}


def rank_fidelity_curve(model: Any, comp: Any, tokens: Int[torch.Tensor, "batch pos"],
                        budgets: Sequence[int], **kwargs: Any) -> list[dict[str, float]]:
    """:func:`fidelity` of ``comp.truncated(budget=b)`` for each total-dimension budget ``b``
    (at most ``comp.max_total_rank``: a larger budget is an error, not the full compression relabeled)."""
    over = [b for b in budgets if b > comp.max_total_rank]
    if over:
        raise ValueError(f"budgets {over[:5]} exceed the {comp.max_total_rank} dimensions this compression can give "
                         f"(comp.max_total_rank): pass budgets <= {comp.max_total_rank}")
    rows = []
    for b in tqdm(budgets, desc="rank-fidelity", leave=False, disable=len(budgets) < 3):
        rows.append({"budget": b, **fidelity(model, comp.truncated(budget=b), tokens, **kwargs)})
    return rows
