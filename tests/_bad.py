"""A count of the bad inputs and faults the suite tries (printed at the end of a run; the README
quotes it). Tests call :func:`tried` once per bad input or injected fault, or use :func:`raises`."""

from __future__ import annotations

import pytest

COUNT = {"n": 0}


def tried(n: int = 1) -> None:
    COUNT["n"] += n


def raises(exc, match: str | None = None):
    """``pytest.raises``, counted as one bad input."""
    tried()
    return pytest.raises(exc, match=match)
