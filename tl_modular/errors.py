"""Exceptions raised by tl_modular.

Every exception says what was expected, what came, and how to fix it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:      # annotations only: labeling raises these errors
    from tl_modular.labeling import Labels

__all__ = ["ArtifactError", "DistributedMismatchError", "LabelingError", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model has an architecture tl_modular cannot cut into channels exactly.

    Raised for mixture-of-experts MLPs, encoders, post-norm blocks, post-embedding
    LayerNorms, TransformerBridge models outside compatibility mode, and anything
    unknown. The message names the feature that is not supported and what is.
    """


class ArtifactError(ValueError):
    """A file tl_modular reads (an artifact it wrote, a checkpoint, a report directory) cannot be
    used: not valid JSON (line and column given), a damaged or truncated safetensors file, a
    missing field or tensor, a tensor of the wrong shape, or a format version this release does
    not read. The message names the file, the problem and how to get a good file again.

    Attributes:
        path: The file (or folder) at fault.
    """

    def __init__(self, message: str, *, path: Any = None) -> None:
        super().__init__(message)
        self.path = path


class DistributedMismatchError(ValueError):
    """The ranks of a ``torch.distributed`` process group disagree on the model, the tokens or
    the settings of a data-parallel pass. Raised on every rank (none waits in a collective); the
    message names what differs and its value on rank 0 and on the rank that differs.
    """


class LabelingError(RuntimeError):
    """Labeling cannot go on, for a reason that retrying will not fix (no API key, a key the
    server refuses, an unknown model or route, a server that cannot be reached), or — with
    ``on_error="raise"`` — some units failed. The message names the reason and the endpoint,
    never the key.

    Attributes:
        reason: A short code: ``"no_key"``, ``"auth"``, ``"not_found"``, ``"refused"``,
            ``"unreachable"`` or ``"failures"``.
        endpoint: The server asked (credentials removed).
        labels: What was labeled before the stop (a ``Labels``; the LLM cache keeps the answers,
            so a re-run resumes), or None.
    """

    def __init__(self, message: str, *, reason: str = "", endpoint: str | None = None,
                 labels: Labels | None = None) -> None:
        super().__init__(message)
        self.reason, self.endpoint, self.labels = reason, endpoint, labels
