"""The ground-truth workbench: a bundled multi-task transformer with known algorithms.

Four tasks share one vocabulary (:mod:`tl_modular.toy.vocab`): induction, modular addition
(mod 31, 30% of pairs held out), bracket depth and sorting (:mod:`~tl_modular.toy.generators`).
The shipped model (:func:`load_model`) solves all four; :func:`train` retrains it or continues a
model on chosen data.

>>> import tl_modular as tlm
>>> model = tlm.toy.load_model()                        # doctest: +SKIP
>>> task = tlm.toy.induction(256, seed=1)
>>> task.accuracy(model(task.clean))                    # doctest: +SKIP
0.99...
"""

from tl_modular.toy.generators import (
    GENERATORS,
    HELD_OUT_FRACTION,
    MODULUS,
    addition_pairs,
    brackets,
    induction,
    mixed_tokens,
    modular_addition,
    sorting,
)
from tl_modular.toy.model import BUNDLED_DIR, MODULAR_DIR, info, load_model, load_modular_model, save_model
from tl_modular.toy.recipe import (
    TrainConfig,
    TrainResult,
    default_config,
    eval_tasks,
    evaluate,
    train,
    training_tasks,
)
from tl_modular.toy.superposition import Superposition, train_superposition
from tl_modular.toy.vocab import N_NUMBERS, TASK_TOKENS, VOCAB, decode, encode, token_id

__all__ = [
    "BUNDLED_DIR", "GENERATORS", "HELD_OUT_FRACTION", "MODULAR_DIR", "MODULUS", "N_NUMBERS", "TASK_TOKENS", "VOCAB",
    "Superposition", "TrainConfig", "TrainResult", "addition_pairs", "brackets", "decode", "default_config", "encode",
    "eval_tasks", "evaluate", "induction", "info", "load_model", "load_modular_model", "mixed_tokens",
    "modular_addition",
    "save_model",
    "sorting", "token_id", "train", "train_superposition", "training_tasks",
]
