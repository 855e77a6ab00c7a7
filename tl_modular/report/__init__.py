"""The whole flow in one call, and its report directory (what ``tl-modular analyze`` runs).

>>> import tl_modular as tlm
>>> path = tlm.report.analyze(tlm.report.bundled_inputs(), "report")   # doctest: +SKIP
>>> path.name                                                          # doctest: +SKIP
'report.html'

The directory holds ``report.html`` (self-contained), ``summary.json``, ``graph.json``,
``compression/`` (safetensors + JSON), ``circuits.json``, ``labels.json`` and the figures.
"""

from __future__ import annotations

from typing import Any

from tl_modular.report.html import render
from tl_modular.report.pipeline import AnalyzeConfig, Inputs, analyze, cache_key

__all__ = ["AnalyzeConfig", "Inputs", "analyze", "bundled_inputs", "cache_key", "render"]


def bundled_inputs(*, n_per_task: int = 128, n_examples: int = 64, seed: int = 0, labeler: Any = None,
                   simulator: Any = None, device: str = "cpu") -> Inputs:
    """The bundled model (on ``device``), its four tasks' prompts as data and as circuit categories, its SAEs."""
    import tl_modular as tlm
    from tl_modular import toy

    model = toy.load_model(device=device)
    tokens, mask, scored = toy.mixed_tokens(n_per_task=n_per_task, seed=seed, scored=True)
    categories = {name: gen(n_examples, seed=seed + 100 + i) for i, (name, gen) in enumerate(toy.GENERATORS.items())}
    return Inputs(model=model, tokens=tokens, name="tl_modular bundled multi-task model", attention_mask=mask,
                  loss_mask=scored, categories=categories, saes=tlm.sae.bundled(model, device=device), labeler=labeler,
                  simulator=simulator, decode=toy.decode)
