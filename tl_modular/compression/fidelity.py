"""How faithful a compression is: CE loss recovered and KL to the clean model, across budgets.

>>> comp.fidelity(model, tokens)                          # doctest: +SKIP
{'clean_loss': 2.31, 'compressed_loss': 2.35, 'ablated_loss': 5.2, 'loss_recovered': 0.986, 'kl': 0.02, ...}
>>> rank_fidelity_curve(model, comp, tokens, budgets=[50, 100, 200])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from tl_modular import _dist
from tl_modular._tokens import check_tokens

if TYPE_CHECKING:      # annotations only: compression.py imports this module
    from tl_modular.compression import Compression

__all__ = ["fidelity", "rank_fidelity_curve"]


# Full-vocabulary floats are what a fidelity score holds most of (32 × 127 × 50257 fp32 is 0.8 GB a
# batch at GPT-2 shape). Bounds, with the same floats as unbounded (each position's log-softmax and KL
# term do not depend on the other rows; the batch's sums are taken over the same tensors as before):
CLEAN_MEMORY = 1 << 30   # clean log-probs kept for every score; batches beyond are run again per score
CHUNK_MEMORY = 1 << 26   # one temporary of the log-softmax, CE and KL of a chunk of a batch's rows


def _logits(model: Any, tokens: torch.Tensor, start: int, batch_size: int, mask: torch.Tensor | None
            ) -> torch.Tensor:
    """One batch's logits ``[b, pos, vocab]``."""
    kwargs = {} if mask is None else {"attention_mask": mask[start:start + batch_size]}
    with torch.no_grad():
        return model(tokens[start:start + batch_size], **kwargs)


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    """Slices of the batch's rows whose next-token log-probs fit in :data:`CHUNK_MEMORY` (at least one row)."""
    per_row = max(1, (logits.shape[1] - 1) * logits.shape[2] * 4)       # float32 log-probs
    step = max(1, CHUNK_MEMORY // per_row)
    return [slice(r, r + step) for r in range(0, logits.shape[0], step)]


def _logprobs(logits: torch.Tensor, rows: slice) -> torch.Tensor:
    """Next-token log-probs ``[rows, pos - 1, vocab]`` of some of a batch's rows."""
    return logits[rows, :-1].float().log_softmax(-1)


def _clean_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The whole batch's next-token log-probs, filled chunk by chunk (no second copy of the batch)."""
    out = torch.empty((logits.shape[0], logits.shape[1] - 1, logits.shape[2]), dtype=torch.float32,
                      device=logits.device)
    for rows in _row_chunks(logits):
        out[rows] = _logprobs(logits, rows)
    return out


def _per_token(logits: torch.Tensor, nxt: torch.Tensor, clean: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each prediction's next-token loss ``[b, pos - 1]`` and, given the clean log-probs, its KL from
    the clean distribution; chunk by chunk of rows."""
    loss = torch.empty(nxt.shape, dtype=torch.float32, device=logits.device)
    kl = None if clean is None else torch.empty_like(loss)
    for rows in _row_chunks(logits):
        q = _logprobs(logits, rows)
        loss[rows] = -q.gather(-1, nxt[rows, ..., None])[..., 0]
        if kl is not None:
            c = clean[rows]
            kl[rows] = (c.exp() * (c - q)).sum(-1)
    return loss, kl


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
        # the clean log-probs are kept (every score's KL needs them) up to CLEAN_MEMORY, run again beyond
        self.clean: list[torch.Tensor | None] = []
        clean, held = 0.0, 0
        for start in self.starts:
            logits = _logits(model, self.tokens, start, batch_size, self.mask)
            kept = None
            if held + logits[:, 1:].numel() * 4 <= CLEAN_MEMORY:
                kept = _clean_logprobs(logits)
                held += kept.numel() * 4
            self.clean.append(kept)
            clean += self._weighted(_per_token(logits, self._next(start), None)[0], start)
            del logits
        with comp.truncated(rank=0).applied(model, channels):
            ablated = 0.0
            for start in self.starts:
                ablated += self._weighted(_per_token(_logits(model, self.tokens, start, batch_size, self.mask),
                                                     self._next(start), None)[0], start)
        sums = _dist.all_reduce_sum({"clean": clean, "ablated": ablated})
        self.clean_loss = sums["clean"] / self.total
        self.ablated_loss = sums["ablated"] / self.total

    def _next(self, start: int) -> torch.Tensor:
        return self.tokens[start:start + self.batch_size, 1:]

    def _weighted(self, per_token: torch.Tensor, start: int) -> float:
        """A batch's per-prediction values summed with the padding weights."""
        return float((per_token * self.weights[start:start + self.batch_size]).sum())

    def score(self, comp: Compression) -> dict[str, float]:
        b = self.batch_size
        loss, kl = 0.0, 0.0               # summed batch by batch in order: the same floats as from a list
        for start, kept in zip(self.starts, self.clean, strict=True):
            clean = kept if kept is not None else _clean_logprobs(
                _logits(self.model, self.tokens, start, b, self.mask))
            with comp.applied(self.model, self.channels):
                logits = _logits(self.model, self.tokens, start, b, self.mask)
            token_loss, token_kl = _per_token(logits, self._next(start), clean)
            del logits, clean
            loss += self._weighted(token_loss, start)
            kl += self._weighted(token_kl, start)
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
