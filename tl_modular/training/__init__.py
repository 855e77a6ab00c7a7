"""Training for legibility: the modularity loss and training with it.

:mod:`~tl_modular.training.trainer` is the one training loop (next-token prediction at the tasks'
scored positions, resumable checkpoints, ``extra_loss`` for penalties); the workbench
(:func:`tl_modular.toy.train`), :func:`train_modular` and :func:`build_interpretable` all run it.
:func:`build_interpretable` (:mod:`~tl_modular.training.interpretable`, the loop) is built from
``build_config`` (:class:`BuildConfig`), ``build_result`` (:class:`BuildResult`, :class:`LayerRecord`),
``targets`` (labels simulated into fixed targets), ``matching`` (the match term and the measures) and
``build_state`` (resumable checkpoints).

>>> import tl_modular as tlm
>>> loss = tlm.training.ModularityLoss(n_modules=4)                             # doctest: +SKIP
>>> result = tlm.training.train_modular(model, None, weight=1.0, steps=300)     # doctest: +SKIP
>>> built = tlm.training.build_interpretable(model, None, steps_per_layer=200)  # doctest: +SKIP
"""

from tl_modular.training.build_config import BuildConfig
from tl_modular.training.build_result import BuildResult, LayerRecord
from tl_modular.training.interpretable import build_interpretable, lm_task
from tl_modular.training.loop import graph_modularity, train_modular
from tl_modular.training.modularity import ModularityLoss, ModularityLossConfig, alignment_matrix, unit_names

__all__ = ["BuildConfig", "BuildResult", "LayerRecord", "ModularityLoss", "ModularityLossConfig", "alignment_matrix",
           "build_interpretable", "graph_modularity", "lm_task", "train_modular", "unit_names"]
