"""The toy workbench's vocabulary: numbers, a few symbols, and one token per task.

Every toy sequence starts with its task token (``IND``, ``ADD``, ``BRK``, ``SRT``), which also
plays the role of a beginning-of-sequence token.

>>> from tl_modular.toy import encode, decode
>>> decode(encode("ADD 3 + 4 = 7"))
'ADD 3 + 4 = 7'
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["N_NUMBERS", "TASK_TOKENS", "VOCAB", "decode", "encode", "token_id"]

#: Number tokens ``0 .. N_NUMBERS-1``: operands and results of modular addition, list elements
#: for sorting, depths for brackets, and the random symbols of induction sequences.
N_NUMBERS = 31
_SYMBOLS = ["+", "=", "(", ")", ">", "PAD"]
#: One token per task; each sequence starts with its task's token.
TASK_TOKENS = {"induction": "IND", "modular_addition": "ADD", "brackets": "BRK", "sorting": "SRT"}
#: The whole vocabulary, in token-id order.
VOCAB: list[str] = [str(i) for i in range(N_NUMBERS)] + _SYMBOLS + list(TASK_TOKENS.values())
_ID = {tok: i for i, tok in enumerate(VOCAB)}


def token_id(token: str) -> int:
    """Id of one token, e.g. ``token_id("+")``."""
    try:
        return _ID[token]
    except KeyError:
        raise KeyError(f"{token!r} is not a toy token; the vocabulary is {' '.join(VOCAB)}") from None


def encode(text: str | Iterable[str]) -> torch.Tensor:
    """Token ids of a space-separated string (or a list of tokens), as a 1-D long tensor."""
    tokens = text.split() if isinstance(text, str) else list(text)
    return torch.tensor([token_id(t) for t in tokens], dtype=torch.long)


def decode(ids: torch.Tensor | Iterable[int]) -> str | list[str]:
    """The space-separated string of a 1-D sequence of ids, or a list of strings for 2-D."""
    if isinstance(ids, torch.Tensor) and ids.ndim == 2:
        return [decode(row) for row in ids]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if any(not 0 <= i < len(VOCAB) for i in ids):
        raise ValueError(f"token ids must lie in [0, {len(VOCAB)}), got {ids}")
    return " ".join(VOCAB[i] for i in ids)
