"""tl_modular: make trained transformers legible, channel by channel.

A TransformerLens plugin: segment a model into channels (embeddings, heads, MLPs), compress
each to the residual-stream subspaces it reads and writes, map them into a graph of modules
and circuits, unfold polysemantic parts with SAEs, and label every part with a language model.

>>> import tl_modular as tlm
>>> model = tlm.toy.load_model()                  # the bundled multi-task model, offline
>>> channels = tlm.segment(model)                 # ChannelSet
>>> comp = tlm.compress(model, tokens)            # doctest: +SKIP

Submodules load on first use: ``tlm.toy`` (the ground-truth workbench), ``tlm.tasks`` (GPT-2
prompt sets), ``tlm.patching``, ``tlm.statistics``, ``tlm.fidelity``, ``tlm.circuits``, ``tlm.sae``
(SAEs, polysemanticity, unfolding), ``tlm.labeling`` (``tlm.label``: LLM labels scored by
simulation), ``tlm.training`` (the modularity loss), ``tlm.report`` (the whole flow),
``tlm.testing``; ``tlm.diff`` compares two models (module :mod:`tl_modular.diffing`).
The package map is ``docs/architecture.md``.
"""

import importlib
import sys
from typing import Any

from tl_modular import _compat, diffing
from tl_modular._tokens import TextCounts, tokens_from_text
from tl_modular.compression import ChannelCompression, Compression, ReadSpace, Side, compress
from tl_modular.diffing import ModelDiff, diff, diff_null
from tl_modular.errors import ArtifactError, DistributedMismatchError, LabelingError, UnsupportedModelError
from tl_modular.graph import ChannelGraph, ModuleRule, build_graph
from tl_modular.segmentation import Channel, ChannelSet, segment
from tl_modular.tasks import Task

# Old module paths stay importable (tl_modular.statistics, tl_modular.task, ...; see _compat).
# ``tlm.diff`` is the function; the module is ``tl_modular.diffing``. Its old path is registered
# here, before anyone imports it, because importing it afresh would rebind ``tlm.diff`` to the module.
_compat.install()
sys.modules.setdefault("tl_modular.diff", diffing)

__version__ = "0.1.0.dev0"

# submodules that load on first use, by attribute name (``tlm.statistics`` is compression's statistics)
_SUBMODULES = {name: f"tl_modular.{name}" for name in ("toy", "textlm", "tasks", "patching", "testing", "circuits",
                                                        "sae", "report", "training", "labeling", "diffing",
                                                        "attribution")}
_SUBMODULES.update(statistics="tl_modular.compression.statistics", fidelity="tl_modular.compression.fidelity")
# names re-exported from submodules that load on first use (labeling pulls in the openai client lazily)
_LAZY = {"label": "labeling", "Labels": "labeling", "OpenAILabeler": "labeling", "OfflineLabeler": "labeling",
         "OfflineSimulator": "labeling", "attribution_graph": "attribution", "AttributionGraph": "attribution"}

__all__ = [
    "ArtifactError",
    "Channel",
    "ChannelCompression",
    "ChannelGraph",
    "ChannelSet",
    "Compression",
    "DistributedMismatchError",
    "LabelingError",
    "ModelDiff",
    "ModuleRule",
    "ReadSpace",
    "Side",
    "Task",
    "TextCounts",
    "UnsupportedModelError",
    *sorted(_LAZY),
    "__version__",
    "build_graph",
    "compress",
    "diff",
    "diff_null",
    "segment",
    "tokens_from_text",
    *sorted(_SUBMODULES),
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    if name in _LAZY:
        return getattr(importlib.import_module(f"tl_modular.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tl_modular' has no attribute {name!r}")
