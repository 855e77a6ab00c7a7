"""The whole flow in one call, and its report directory (what ``tl-modular analyze`` runs).

>>> import tl_modular as tlm
>>> path = tlm.report.analyze(tlm.report.bundled_inputs(), "report")   # doctest: +SKIP
>>> path.name                                                          # doctest: +SKIP
'report.html'

The directory holds ``report.html`` (an interactive page in one file, :mod:`tl_modular.report.html`),
``summary.json``, ``graph.json``, ``modules.json``, ``compression/`` (safetensors + JSON),
``circuits.json``, ``labels.json``, ``polysemanticity.json``, ``rank_fidelity.json`` and the static
figures in ``figures/``. ``python -m tl_modular.report DIR`` re-renders the page from the JSON files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from tl_modular.report.html import render, render_diff
from tl_modular.report.pipeline import AnalyzeConfig, Inputs, analyze, cache_key

if TYPE_CHECKING:
    from tl_modular.labeling import Labeler, Simulator

__all__ = ["BUNDLED_MODELS", "AnalyzeConfig", "Inputs", "analyze", "bundled_inputs", "cache_key", "render",
           "render_diff", "textlm_inputs"]

#: The bundled models ``tl-modular analyze --model`` takes by name (no download).
BUNDLED_MODELS = ("toy-modular", "toy", "textlm")


def bundled_inputs(*, n_per_task: int = 128, n_examples: int = 64, seed: int = 0, labeler: Labeler | None = None,
                   simulator: Simulator | None = None, variant: Literal["plain", "modular"] = "plain",
                   device: str = "cpu") -> Inputs:
    """The bundled model, its four tasks' prompts as data and as circuit categories, its SAEs.

    Args:
        variant: ``"plain"`` (:func:`tl_modular.toy.load_model`, one module) or ``"modular"``
            (:func:`tl_modular.toy.load_modular_model`: the same model trained on with the
            modularity loss, four modules, with SAEs of its own).
        device: Where the model and its SAEs live.
    """
    import tl_modular as tlm
    from tl_modular import toy

    if variant not in ("plain", "modular"):
        raise ValueError(f"variant must be 'plain' or 'modular', got {variant!r}")
    if variant == "modular":
        model = toy.load_modular_model(device=device)
        saes = tlm.sae.SAESet.load(toy.MODULAR_DIR / "saes", model, device=device)
        name = "tl_modular bundled multi-task model, modularity-trained"
        facts = toy.info(toy.MODULAR_DIR)
        given = {"modules": facts["loss_modules"],
                 "source": f"the modules tl_modular.training.train_modular trained it with (weight {facts['weight']})"}
    else:
        model = toy.load_model(device=device)
        saes = tlm.sae.bundled(model, device=device)
        name = "tl_modular bundled multi-task model"
        given = None
    tokens, mask, scored = toy.mixed_tokens(n_per_task=n_per_task, seed=seed, scored=True)
    categories = {task: gen(n_examples, seed=seed + 100 + i) for i, (task, gen) in enumerate(toy.GENERATORS.items())}
    return Inputs(model=model, tokens=tokens, name=name, attention_mask=mask, loss_mask=scored, categories=categories,
                  saes=saes, labeler=labeler, simulator=simulator, decode=toy.decode, modules=given)


def textlm_inputs(*, n_tokens: int = 4096, seq_len: int = 128, n_examples: int = 32, seed: int = 0,
                  labeler: Labeler | None = None, simulator: Simulator | None = None, model: Any = None,
                  tokens: Any = None, data: Any = None) -> Inputs:
    """The bundled real-text GPT-2 (:mod:`tl_modular.textlm`) on its shipped text (Python
    documentation and source), with the four GPT-2 prompt sets as circuit categories."""
    from tl_modular import tasks, textlm

    model = textlm.load_model() if model is None else model
    if tokens is None:
        tokens = textlm.tokens("train", n_tokens, seq_len)
        data = {"source": "tl_modular.textlm train sample", "kind": "tokens", "read": len(textlm.token_stream("train")),
                "used": int(tokens.shape[0] * (seq_len - 1)), "rows": int(tokens.shape[0]), "seq_len": seq_len}
        data["dropped"] = data["read"] - data["used"]
    categories = {name: getattr(tasks, name)(model.tokenizer, n_examples, seed=seed)
                  for name in ("ioi", "greater_than", "docstring", "induction")}
    return Inputs(model=model, tokens=tokens, name="tl_modular bundled real-text GPT-2 (textlm)",
                  categories=categories, labeler=labeler, simulator=simulator, decode=model.to_string, data=data)
