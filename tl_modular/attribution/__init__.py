"""Feature-level attribution graphs: per-prompt direct effects between a compression's write
directions, error, embedding and bias nodes and a logit node, with pruning by influence and
verification by intervention."""

from tl_modular.attribution.graph import AttributionGraph, Node, attribution_graph

__all__ = ["AttributionGraph", "Node", "attribution_graph"]
