"""The channel graph: route strengths, the graph itself, min cuts and modules, and its views.

- :mod:`~tl_modular.graph.routes` — route strengths between compressed channels (static and data).
- :mod:`~tl_modular.graph.graph` — :func:`build_graph` and :class:`ChannelGraph` (modules,
  hierarchy, modularity against null models, route checks, lesions, save/load).
- :mod:`~tl_modular.graph.mincut` — Gomory–Hu trees (networkx or igraph), cuts, partitions.
- :mod:`~tl_modular.graph.views` — GraphML, DOT and matplotlib drawings.

>>> graph = tlm.build_graph(comp, model=model, tokens=tokens)     # doctest: +SKIP
>>> graph.modules()                                               # doctest: +SKIP
"""

from tl_modular._stats import spearman
from tl_modular.graph.graph import ChannelGraph, ModuleRule, build_graph
from tl_modular.graph.mincut import Split

__all__ = ["ChannelGraph", "ModuleRule", "Split", "build_graph", "spearman"]
