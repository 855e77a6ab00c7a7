"""The bundled model's recipe: its architecture, its training data and evaluation sets, and
:func:`train` / :func:`evaluate` with those as defaults.

The loop itself is :mod:`tl_modular.training.trainer` (shared with modularity training and model
diffing); this module only says what the workbench trains on.

>>> result = train(steps=6000, checkpoint_dir="runs/toy")      # doctest: +SKIP
>>> result.model, result.history[-1]["accuracy"]                # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tl_modular.tasks.task import Task
from tl_modular.toy.generators import GENERATORS, modular_addition
from tl_modular.toy.vocab import VOCAB
from tl_modular.training import trainer
from tl_modular.training.trainer import TrainConfig, TrainResult

__all__ = ["TrainConfig", "TrainResult", "default_config", "eval_tasks", "evaluate", "train", "training_tasks"]


def default_config(seed: int = 0) -> Any:
    """The bundled model's architecture: 2 layers, d_model 128, 4 heads of 32, d_mlp 512, GELU,
    LayerNorm, rotary positions.

    Rotary positions keep absolute positions out of the residual stream, so induction is
    learned by the textbook circuit (a previous-token head feeding an induction head's keys);
    with learned absolute positions the model found a positional workaround instead.
    """
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=len(VOCAB), n_ctx=32,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=32,
        default_prepend_bos=False, seed=seed, model_name="tl-modular-toy",
    )


def training_tasks(pool_size: int = 20_000, seed: int = 0) -> list[Task]:
    """The default training data: a pool of each task (modular addition from its train split)."""
    return [gen(pool_size, seed=seed * 1000 + i) if name != "modular_addition"
            else modular_addition(pool_size, seed=seed * 1000 + i, split="train")
            for i, (name, gen) in enumerate(GENERATORS.items())]


def eval_tasks(n: int = 512, seed: int = 10_000) -> dict[str, Task]:
    """Fresh evaluation sets (seeds no training pool uses); modular addition on every held-out
    pair (``modular_addition_heldout``) and on the training pairs."""
    tasks = {name: gen(n, seed=seed + i) for i, (name, gen) in enumerate(GENERATORS.items())
             if name != "modular_addition"}
    tasks["modular_addition"] = modular_addition(None, split="train")
    tasks["modular_addition_heldout"] = modular_addition(None, split="test")
    return tasks


def evaluate(model: Any, tasks: Mapping[str, Task] | None = None, batch_size: int = 512) -> dict[str, float]:
    """Accuracy (argmax at every scored position) per task; defaults to :func:`eval_tasks`."""
    return trainer.evaluate(model, eval_tasks() if tasks is None else tasks, batch_size)


def train(
    model: Any = None,
    data: Task | Sequence[Task] | Mapping[str, Task] | None = None,
    *,
    extra_loss: Callable[[Any], Any] | None = None,
    callback: Callable[[int, Any, dict[str, Any]], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    eval_sets: Mapping[str, Task] | None = None,
    progress: bool = True,
    **config: Any,
) -> TrainResult:
    """Train a ``HookedTransformer`` on next-token prediction at the tasks' scored positions.

    :func:`tl_modular.training.trainer.train` with the workbench's defaults.

    Args:
        model: The model to continue; ``None`` builds :func:`default_config` from scratch.
        data: Tasks to train on (their ``clean`` tokens, ``answers`` at ``positions``); each
            step draws ``batch_size`` examples from every task. ``None``: the four-task mix
            (:func:`training_tasks`).
        extra_loss: ``extra_loss(model) -> scalar`` added to the loss every step (e.g. a
            modularity penalty).
        callback: ``callback(step, model, record)`` after every evaluation; return ``True``
            to stop early.
        checkpoint_dir: Save a resumable checkpoint here every ``checkpoint_every`` steps and
            at the end; if it already holds one, training resumes from it.
        eval_sets: Tasks evaluated every ``eval_every`` steps; default :func:`eval_tasks`
            when ``data`` is ``None``, else ``data`` itself.
        progress: Show a progress bar.
        **config: Fields of :class:`TrainConfig` (``steps``, ``lr``, ``seed``, ...).

    Returns:
        :class:`TrainResult` with the model (in eval mode) and the evaluation history.
    """
    cfg = TrainConfig(**config)
    if model is None:
        from transformer_lens import HookedTransformer

        model = HookedTransformer(default_config(cfg.seed))
    if data is None:
        data = training_tasks(cfg.pool_size, cfg.seed)
        eval_sets = eval_tasks() if eval_sets is None else eval_sets
    return trainer.train(model, data, extra_loss=extra_loss, callback=callback, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, eval_sets=eval_sets, progress=progress, **config)
