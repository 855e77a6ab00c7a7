"""Training for legibility: the modularity loss and training with it.

>>> import tl_modular as tlm
>>> loss = tlm.training.ModularityLoss(n_modules=4)                             # doctest: +SKIP
>>> result = tlm.training.train_modular(model, None, weight=1.0, steps=300)     # doctest: +SKIP
"""

from tl_modular.training.loop import graph_modularity, train_modular
from tl_modular.training.modularity import ModularityLoss, ModularityLossConfig, alignment_matrix, unit_names

__all__ = ["ModularityLoss", "ModularityLossConfig", "alignment_matrix", "graph_modularity", "train_modular",
           "unit_names"]
