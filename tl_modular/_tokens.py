"""Tokens: text turned into the ``[batch, pos]`` rows every pass takes, with nothing dropped silently;
the one check every stage runs on token batches, and the one rule for which positions count.

Position 0 (BOS in GPT-2; an outlier residual norm in trained models) and padding never enter
statistics: :func:`valid_positions` is that rule, :func:`position_weights` the same as weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from jaxtyping import Bool, Float, Int

__all__ = ["TextCounts", "check_tokens", "position_weights", "tokens_from_text", "valid_positions"]


def check_tokens(tokens: Any, attention_mask: Any = None, *, model: Any = None, name: str = "tokens"
                 ) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"] | None]:
    """Check a ``[batch, pos]`` token batch (and its mask) before a pass; returns them unchanged.

    With ``model``, also check the length against ``model.cfg.n_ctx`` and the ids against
    ``model.cfg.d_vocab`` (a negative id would silently wrap around in an embedding lookup).
    ``name`` is the argument's name in the error messages.

    Raises:
        TypeError: ``tokens`` is not a 2-D integer tensor.
        ValueError: no sequence of at least two tokens (position 0 is excluded from statistics),
            rows longer than ``n_ctx``, ids outside the vocabulary, or a mask of another shape.

    >>> check_tokens(torch.tensor([[1, 2, 3]]))[0].shape
    torch.Size([1, 3])
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int):
        raise TypeError(f"{name} must be a [batch, pos] integer tensor (model.to_tokens(...) gives one), got "
                        f"{getattr(tokens, 'shape', type(tokens))}")
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(f"{name} {list(tokens.shape)} are empty: need at least one sequence of two or more "
                         "tokens (position 0 is excluded from statistics)")
    if model is not None:
        if tokens.shape[1] > model.cfg.n_ctx:
            raise ValueError(f"{name}: sequences of {tokens.shape[1]} tokens are longer than the model's context "
                             f"(n_ctx={model.cfg.n_ctx}); split them into rows of at most {model.cfg.n_ctx} tokens")
        d_vocab = model.cfg.d_vocab
        bad = (tokens < 0) | (tokens >= d_vocab)
        if bad.any():
            row, pos = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}[{row}, {pos}] = {int(tokens[row, pos])} is not a token id of this model: "
                             f"token ids must lie in [0, d_vocab={d_vocab}) ({int(bad.sum())} id(s) outside); "
                             "tokenize with this model's tokenizer")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask {list(attention_mask.shape)} must match {name} {list(tokens.shape)}")
    return tokens, attention_mask


def valid_positions(tokens: Int[torch.Tensor, "batch pos"], attention_mask: torch.Tensor | None = None
                    ) -> Bool[torch.Tensor, "batch pos"]:
    """Positions that enter statistics: not position 0 (BOS outlier) and not padding.

    >>> valid_positions(torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 0]])).tolist()
    [[False, True, False]]
    """
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    if attention_mask is not None:
        keep &= attention_mask.to(torch.bool).to(keep.device)
    return keep


def position_weights(tokens: Int[torch.Tensor, "batch pos"], attention_mask: torch.Tensor | None = None
                     ) -> Float[torch.Tensor, "batch pos"]:
    """:func:`valid_positions` as float64 weights: 1 for real tokens after position 0, else 0.

    >>> position_weights(torch.tensor([[5, 6, 7]])).tolist()
    [[0.0, 1.0, 1.0]]
    """
    w = torch.ones(tokens.shape, dtype=torch.float64, device=tokens.device)
    w[:, 0] = 0
    if attention_mask is not None:
        w = w * attention_mask.to(w)
    return w


@dataclass(frozen=True)
class TextCounts:
    """How much of a text :func:`tokens_from_text` used.

    Attributes:
        read: Tokens in the whole text (tokenized without truncation, no special tokens).
        used: Text tokens placed in the rows (the BOS tokens added per row not counted).
        dropped: ``read - used``: the tail past ``n_tokens``, and the last partial row.
        rows, seq_len: The shape of the result.
        bos: Whether each row starts with the tokenizer's BOS token.
    """

    read: int
    used: int
    dropped: int
    rows: int
    seq_len: int
    bos: bool

    def __str__(self) -> str:
        per_row = f"BOS + {self.seq_len - 1}" if self.bos else str(self.seq_len)
        return (f"read {self.read:,} tokens, used {self.used:,} in {self.rows:,} rows of {self.seq_len} "
                f"({per_row} text tokens), dropped {self.dropped:,}")


@overload
def tokens_from_text(model: Any, text: str, n_tokens: int | None = ..., seq_len: int = ..., *,
                     return_counts: Literal[False] = ...) -> Int[torch.Tensor, "batch pos"]: ...
@overload
def tokens_from_text(model: Any, text: str, n_tokens: int | None = ..., seq_len: int = ..., *,
                     return_counts: Literal[True]) -> tuple[Int[torch.Tensor, "batch pos"], TextCounts]: ...


def tokens_from_text(model: Any, text: str, n_tokens: int | None = None, seq_len: int = 128, *,
                     return_counts: bool = False) -> Any:
    """Cut a text into rows of ``seq_len`` tokens for analysis, reading all of it.

    The whole text is tokenized by the model's tokenizer itself (``model.to_tokens`` would truncate
    to ``n_ctx``), then laid out in rows of ``seq_len``: the BOS token and ``seq_len - 1`` text tokens
    when the model prepends BOS by default, else ``seq_len`` text tokens. Rows are taken until
    ``n_tokens`` tokens (rows included BOS) are reached; what is left is counted as dropped.

    Args:
        model: A HookedTransformer (or anything with ``tokenizer`` and ``cfg.n_ctx``), or a Hugging
            Face tokenizer (then nothing bounds ``seq_len``).
        text: The text.
        n_tokens: Tokens wanted in all, BOS included (``None``: as many full rows as the text gives).
            At least one row is always returned.
        seq_len: Tokens per row, at most the model's ``n_ctx``.
        return_counts: Also return a :class:`TextCounts` (read, used, dropped).

    Raises:
        ValueError: ``seq_len`` above ``n_ctx`` or below 2, ``n_tokens`` below 1, or a text too short
            for one row (each naming the numbers).

    >>> rows, counts = tlm.tokens_from_text(model, open("book.txt").read(), 4096, 128,
    ...                                     return_counts=True)   # doctest: +SKIP
    >>> print(counts)                                             # doctest: +SKIP
    read 96,304 tokens, used 4,064 in 32 rows of 128 (BOS + 127 text tokens), dropped 92,240
    """
    tokenizer, n_ctx, bos_default = _tokenizer_of(model)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if n_ctx is not None and seq_len > n_ctx:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of n_ctx={n_ctx} tokens: pass "
                         f"seq_len <= {n_ctx}")
    if n_tokens is not None and (not isinstance(n_tokens, int) or n_tokens < 1):
        raise ValueError(f"n_tokens must be a positive integer or None, got {n_tokens!r}")
    bos = tokenizer.bos_token_id if bos_default else None
    # verbose=False: the tokenizer would warn that the text exceeds its model_max_length, which is
    # exactly what this function handles
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    body = seq_len - (bos is not None)
    if len(ids) < body:
        raise ValueError(f"the text has {len(ids):,} tokens, fewer than one row of {seq_len} needs ({body} text "
                         "tokens): pass a longer text or a smaller seq_len")
    rows = len(ids) // body
    if n_tokens is not None:
        rows = max(1, min(rows, n_tokens // seq_len))
    table = torch.tensor(ids[: rows * body], dtype=torch.long).reshape(rows, body)
    if bos is not None:
        table = torch.cat([torch.full((rows, 1), bos, dtype=torch.long), table], 1)
    if not return_counts:
        return table
    counts = TextCounts(read=len(ids), used=rows * body, dropped=len(ids) - rows * body, rows=rows, seq_len=seq_len,
                        bos=bos is not None)
    return table, counts


def _tokenizer_of(model: Any) -> tuple[Any, int | None, bool]:
    """The tokenizer, the context length (None when unbounded) and whether rows start with BOS."""
    cfg = getattr(model, "cfg", None)
    if cfg is None and callable(model) and hasattr(model, "convert_ids_to_tokens"):     # a bare tokenizer
        return model, None, model.bos_token_id is not None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: tokenize the text yourself and pass token ids, or set "
                         "model.tokenizer")
    prepend = bool(getattr(cfg, "default_prepend_bos", True)) and tokenizer.bos_token_id is not None
    return tokenizer, getattr(cfg, "n_ctx", None), prepend
