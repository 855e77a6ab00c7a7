"""Exceptions raised by tl_modular.

Every exception says what was expected, what came, and how to fix it.
"""

from __future__ import annotations

__all__ = ["UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model has an architecture tl_modular cannot cut into channels exactly.

    Raised for mixture-of-experts MLPs, encoders, post-norm blocks, post-embedding
    LayerNorms, TransformerBridge models outside compatibility mode, and anything
    unknown. The message names the feature that is not supported and what is.
    """
