"""Training with the modularity loss: the workbench's loop plus a penalty and modularity tracking.

:func:`train_modular` continues a pretrained model (or trains one from scratch) through
:func:`tl_modular.toy.train` — the same loop, checkpoints and progress bar — adding
``weight * ModularityLoss(model)`` through its ``extra_loss`` hook and recording, at every
evaluation, the original loss, the cross-module fraction and (every ``graph_every`` steps, when
graph tokens are given) the graph's modularity z-score against its null model.

>>> result = train_modular(toy.load_model(), None, weight=1.0, steps=300)   # doctest: +SKIP
>>> result.history[-1]["cross_fraction"], result.history[-1]["accuracy"]     # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tl_modular.compression.compression import compress
from tl_modular.graph.graph import build_graph
from tl_modular.tasks.task import Task
from tl_modular.training.modularity import ModularityLoss, _params, _spec, alignment_matrix
from tl_modular.training.trainer import TrainConfig, TrainResult

__all__ = ["graph_modularity", "train_modular"]


def graph_modularity(model: Any, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                     loss_mask: torch.Tensor | None = None, n_modules: int | None = 2, n_null: int = 50,
                     metric: str = "logit", seed: int = 0, modules: Any = None) -> dict[str, Any]:
    """Modularity of the model's channel graph against the graph's null model.

    A fresh :func:`tlm.compress` and :func:`tlm.build_graph` on ``tokens``, then
    ``graph.modularity`` (edge permutations within layer pairs). Returns ``{"z": z of Newman's Q,
    "Q", "crossing", "crossing_z", "modules": [...]}`` for the graph's own modules and, with
    ``modules=`` (e.g. the loss's), ``"z_modules"`` and ``"Q_modules"``: the same score for that
    fixed partition (``graph.modularity(modules=...)``).

    ``n_modules`` is at most this many: the graph's tree may admit fewer modules of the minimum
    size (then as many as it admits, with a warning; ``"modules"`` lists those found).
    """
    was_training = model.training
    model.eval()
    try:
        comp = compress(model, tokens, attention_mask=attention_mask, progress=False)
        graph = build_graph(comp, model=model, tokens=tokens, attention_mask=attention_mask,
                                loss_mask=loss_mask, metric=metric, progress=False)
        if n_modules is not None:
            most = len(graph.hierarchy()) + 1
            if n_modules > most:
                warnings.warn(f"the channel graph admits at most {most} module{'s' if most > 1 else ''} of the minimum "
                              f"size, not n_modules={n_modules}: its modularity is scored for {most}", RuntimeWarning,
                              stacklevel=2)
                n_modules = most
        res = graph.modularity(n_null=n_null, n_modules=n_modules, seed=seed, progress=False)
        fixed = graph.modularity(n_null=n_null, seed=seed, modules=modules, progress=False) if modules else None
        found = graph.modules(n_modules=n_modules)
    finally:
        model.train(was_training)
    out = {"z": res["Q"]["z"], "Q": res["Q"]["value"], "crossing": res["crossing"]["value"],
           "crossing_z": res["crossing"]["z"], "modules": [sorted(m) for m in found]}
    if fixed is not None:
        out.update(z_modules=fixed["Q"]["z"], Q_modules=fixed["Q"]["value"])
    return out


def train_modular(
    model: Any,
    data: Task | Sequence[Task] | Mapping[str, Task] | None,
    weight: float,
    steps: int,
    *,
    loss: ModularityLoss | None = None,
    graph_tokens: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    graph_every: int = 0,
    graph_n_modules: int | None = 2,
    n_null: int = 50,
    callback: Callable[[int, Any, dict[str, Any]], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **config: Any,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``total = lm_loss + weight * modularity_loss(model)``.

    Args:
        model: A ``HookedTransformer`` to continue, or ``None`` to train the workbench's
            architecture from scratch.
        data: Tasks for :func:`tl_modular.toy.train` (``None``: the workbench's four-task mix).
        weight: Weight of the modularity loss (``0`` gives the control run, tracked alike).
        steps: Total optimisation steps (a resumed run continues up to it).
        loss: The :class:`ModularityLoss` (default: channel level, 4 modules, refreshed every
            100 steps by spectral clustering).
        graph_tokens: ``tokens`` or ``(tokens, attention_mask, loss_mask)`` for the graph's
            modularity z-scores (:func:`graph_modularity`: the graph's own modules, and the loss's
            modules as ``z_modules``); ``None`` skips them.
        graph_every: Steps between graph measurements (rounded to evaluations; 0: start and end only).
        graph_n_modules: Modules the graph is cut into for its z-score (at most: see :func:`graph_modularity`).
        n_null: Null-model samples per graph measurement.
        callback: As in :func:`tl_modular.toy.train`, after the modularity fields are added.
        checkpoint_dir: Resumable checkpoints (the loss's modules are re-clustered on resume).
        progress: Show the progress bar.
        **config: :class:`tl_modular.toy.TrainConfig` fields (``lr``, ``eval_every``, ``batch_size``, ...).

    Returns:
        The :class:`tl_modular.toy.TrainResult`; each history record adds ``modularity_loss``,
        ``cross_fraction`` and ``modules`` and, where measured, ``graph`` (:func:`graph_modularity`).
        ``result.initial`` holds the same measures before training.
    """
    # the workbench supplies the defaults (model and data None); toy imports this package's trainer,
    # so toy is imported when called rather than at module level
    from tl_modular.toy.recipe import default_config, train

    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if graph_every < 0:
        raise ValueError(f"graph_every must be >= 0, got {graph_every}")
    if model is None:
        from transformer_lens import HookedTransformer

        model = HookedTransformer(default_config(TrainConfig(**config).seed))
    loss = loss if loss is not None else ModularityLoss(refresh_every=100)
    if graph_tokens is not None and not isinstance(graph_tokens, tuple):
        graph_tokens = (graph_tokens,)
    last_graph = [-1]

    def measure(step: int, record: dict[str, Any], force: bool = False) -> None:
        with torch.no_grad():
            if loss.membership is None:
                loss.refresh(model)
            record["modularity_loss"] = float(loss.penalty(_alignment(model, loss)))
            record["cross_fraction"] = loss.cross_fraction(model)
            record["modules"] = [sorted(m) for m in loss.modules()]
        due = graph_every and (last_graph[0] < 0 or step - last_graph[0] >= graph_every)
        if graph_tokens is not None and (force or due):
            toks, *rest = graph_tokens
            mask = rest[0] if rest else None
            scored = rest[1] if len(rest) > 1 else None
            record["graph"] = graph_modularity(model, toks, attention_mask=mask, loss_mask=scored,
                                               n_modules=graph_n_modules, n_null=n_null, modules=loss.modules())
            last_graph[0] = step

    initial: dict[str, Any] = {"step": 0}
    measure(0, initial, force=True)

    def on_eval(step: int, m: Any, record: dict[str, Any]) -> bool | None:
        measure(step, record, force=step >= steps)
        return callback(step, m, record) if callback is not None else None

    extra = (lambda m: weight * loss(m)) if weight > 0 else None
    result = train(model, data, extra_loss=extra, callback=on_eval, checkpoint_dir=checkpoint_dir,
                   progress=progress, steps=steps, **config)
    result.initial = initial
    return result


def _alignment(model: Any, loss: ModularityLoss) -> torch.Tensor:
    return alignment_matrix({k: v.detach() for k, v in _params(model).items()}, _spec(model), loss.config.level)
