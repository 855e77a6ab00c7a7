"""How faithful a compression is: CE loss recovered and KL to the clean model, across budgets.

>>> comp.fidelity(model, tokens)                          # doctest: +SKIP
{'clean_loss': 2.31, 'compressed_loss': 2.35, 'ablated_loss': 5.2, 'loss_recovered': 0.986, 'kl': 0.02, ...}
>>> rank_fidelity_curve(model, comp, tokens, budgets=[50, 100, 200])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from tl_modular import _dist
from tl_modular._tokens import check_tokens

if TYPE_CHECKING:      # annotations only: compression.py imports this module
    from tl_modular.compression import Compression

__all__ = ["fidelity", "rank_fidelity_curve"]


def _logprobs(model: Any, tokens: torch.Tensor, starts: Sequence[int], batch_size: int, mask: torch.Tensor | None
              ) -> Iterator[torch.Tensor]:
    """Each batch's next-token log-probs ``[b, pos - 1, vocab]`` in turn (a list of them all would
    hold GBs of full-vocabulary floats: 32 × 127 × 50257 fp32 is 0.8 GB)."""
    for start in starts:
        kwargs = {} if mask is None else {"attention_mask": mask[start:start + batch_size]}
        with torch.no_grad():
            logits = model(tokens[start:start + batch_size], **kwargs)
        yield logits[:, :-1].float().log_softmax(-1)


def _ce(lp: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, start: int, batch_size: int) -> float:
    """One batch's summed next-token loss, weighted."""
    nxt = tokens[start:start + batch_size, 1:]
    return float((-lp.gather(-1, nxt[..., None])[..., 0] * weights[start:start + batch_size]).sum())


def _ce_sum(logprobs: Iterable[torch.Tensor], tokens: torch.Tensor, weights: torch.Tensor, starts: Sequence[int],
            batch_size: int) -> float:
    """Summed next-token loss over this rank's batches (``starts``), weighted."""
    total = 0.0
    for start, lp in zip(starts, logprobs, strict=True):
        total += _ce(lp, tokens, weights, start, batch_size)
    return total


def fidelity(model: Any, comp: Compression, tokens: Int[torch.Tensor, "batch pos"], *, batch_size: int = 32,
             attention_mask: torch.Tensor | None = None, channels: Sequence[str] | None = None) -> dict[str, float]:
    """CE loss of the clean model, of the compressed one, and of the model with every compressed
    channel mean-ablated; ``loss_recovered = (ablated - compressed) / (ablated - clean)``; the
    mean KL divergence from the clean to the compressed next-token distribution. Predictions
    of padded positions are excluded. Under ``torch.distributed`` each rank scores its shard of
    the batches and every rank returns the totals (summed in float64)."""
    return _Reference(model, comp, tokens, batch_size, attention_mask, channels).score(comp)


class _Reference:
    """The clean and mean-ablated runs, computed once and scored against any number of
    compressions of the same channels (a rank-fidelity curve needs one new run per point)."""

    def __init__(self, model: Any, comp: Compression, tokens: torch.Tensor, batch_size: int,
                 attention_mask: torch.Tensor | None, channels: Sequence[str] | None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (sequences per forward pass), got {batch_size!r}")
        tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
        self.model, self.batch_size, self.channels = model, batch_size, channels
        self.tokens = tokens.to(model.cfg.device)
        self.weights = torch.ones(self.tokens[:, 1:].shape, device=self.tokens.device)
        self.mask = None
        if attention_mask is not None:
            self.mask = attention_mask.to(self.tokens.device)
            self.weights = self.weights * self.mask[:, 1:]
        _dist.check_consistent("fidelity", model, tokens, attention_mask, batch_size=batch_size, channels=channels)
        self.starts = _dist.batch_starts(tokens.shape[0], batch_size)      # this rank's batches
        self.total = float(self.weights.sum())
        # the clean log-probs are kept (every score's KL needs them); the others are summed batch by batch
        self.clean = list(_logprobs(model, self.tokens, self.starts, batch_size, self.mask))
        with comp.truncated(rank=0).applied(model, channels):
            ablated = _ce_sum(_logprobs(model, self.tokens, self.starts, batch_size, self.mask), self.tokens,
                              self.weights, self.starts, batch_size)
        sums = _dist.all_reduce_sum({"clean": _ce_sum(self.clean, self.tokens, self.weights, self.starts, batch_size),
                                     "ablated": ablated})
        self.clean_loss = sums["clean"] / self.total
        self.ablated_loss = sums["ablated"] / self.total

    def score(self, comp: Compression) -> dict[str, float]:
        b, w = self.batch_size, self.weights
        loss, kl = 0.0, 0.0               # summed batch by batch in order: the same floats as from a list
        with comp.applied(self.model, self.channels):
            for s, c, q in zip(self.starts, self.clean,
                               _logprobs(self.model, self.tokens, self.starts, b, self.mask), strict=True):
                loss += _ce(q, self.tokens, w, s, b)
                kl += float(((c.exp() * (c - q)).sum(-1) * w[s:s + b]).sum())
        sums = _dist.all_reduce_sum({"loss": loss, "kl": kl})
        loss, kl = sums["loss"] / self.total, sums["kl"] / self.total
        gap = self.ablated_loss - self.clean_loss
        recovered = (self.ablated_loss - loss) / gap if gap != 0 else float("nan")
        return {"clean_loss": self.clean_loss, "compressed_loss": loss, "ablated_loss": self.ablated_loss,
                "loss_recovered": recovered, "kl": kl, "dimensions": comp.total_rank,
                "max_dimensions": comp.max_total_rank}


def rank_fidelity_curve(model: Any, comp: Compression, tokens: Int[torch.Tensor, "batch pos"],
                        budgets: Sequence[int], *, batch_size: int = 32, attention_mask: torch.Tensor | None = None,
                        channels: Sequence[str] | None = None, progress: bool = True) -> list[dict[str, float]]:
    """:func:`fidelity` of ``comp.truncated(budget=b)`` for each total-dimension budget ``b`` (the
    clean and ablated runs are shared by every point). A budget above ``comp.max_total_rank`` is an
    error, not the full compression relabeled. ``progress=False`` hides the progress bar."""
    over = [b for b in budgets if b > comp.max_total_rank]
    if over:
        raise ValueError(f"budgets {over[:5]} exceed the {comp.max_total_rank} dimensions this compression can give "
                         f"(comp.max_total_rank): pass budgets <= {comp.max_total_rank}")
    ref = _Reference(model, comp, tokens, batch_size, attention_mask, channels)
    rows = []
    for b in tqdm(budgets, desc="rank-fidelity", leave=False,
                  disable=not progress or len(budgets) < 3 or not _dist.is_main()):
        rows.append({"budget": b, **ref.score(comp.truncated(budget=b))})
    return rows
