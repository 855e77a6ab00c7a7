"""Compression: per-channel statistics, the low-rank read/write sides, their restriction, fidelity.

- :mod:`~tl_modular.compression.statistics` — one streaming pass of input, output and Jacobian
  moments per channel (:func:`collect_statistics`).
- :mod:`~tl_modular.compression.compression` — :func:`compress` and :class:`Compression` (read and
  write sides per channel, save/load, ``applied(model)``).
- :mod:`~tl_modular.compression.restriction` — the hooks that run a model with channels restricted.
- :mod:`~tl_modular.compression.fidelity` — CE loss recovered and KL, rank–fidelity curves.
- :mod:`~tl_modular.compression.fisher` — the Fisher of the model's predictions at every layer
  output and read port (:func:`collect_fisher`): bases and budgets by what the output uses.
- :mod:`~tl_modular.compression.refine` — encoders/decoders fitted end to end to the clean
  model's KL at fixed ranks (``Compression.refined``).

>>> comp = tlm.compress(model, tokens)                       # doctest: +SKIP
>>> comp["L1.MLP"].read.basis.shape                           # doctest: +SKIP
"""

from tl_modular.compression.compression import ChannelCompression, Compression, ReadSpace, Side, compress
from tl_modular.compression.fidelity import rank_fidelity_curve
from tl_modular.compression.fisher import FisherStats, collect_fisher
from tl_modular.compression.statistics import (
    InputStats,
    PortStats,
    Statistics,
    WriteStats,
    collect_statistics,
    read_map,
)

__all__ = ["ChannelCompression", "Compression", "FisherStats", "InputStats", "PortStats", "ReadSpace", "Side",
           "Statistics", "WriteStats", "collect_fisher", "collect_statistics", "compress", "rank_fidelity_curve",
           "read_map"]
