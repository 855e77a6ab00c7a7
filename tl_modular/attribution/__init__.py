"""Feature-level attribution graphs: per-prompt direct effects between a compression's write
directions, error, embedding and bias nodes and a logit node (:mod:`.graph`), pruning by the
logit's influence (:mod:`.pruning`), verification by intervention (:mod:`.intervention`) and a
JSON format (:mod:`.graph`), and feature circuits per category (:mod:`.categories`).

>>> comp = tlm.compress(model, task.clean)                         # doctest: +SKIP
>>> graphs = tlm.attribution_graph(model, task, units=comp)         # one per prompt
>>> kept = [tlm.attribution.prune(g, edge_threshold=0.9) for g in graphs]
>>> tlm.attribution.faithfulness(model, task, comp, kept, n_random=5)  # doctest: +SKIP
>>> tlm.attribution.aggregate({"induction": graphs}).shared()        # doctest: +SKIP
"""

from tl_modular.attribution.build import attribution_graph
from tl_modular.attribution.categories import AttributionSet, FeatureCircuit, aggregate, feature_name
from tl_modular.attribution.graph import AttributionGraph, Node, load_graph, save_graph
from tl_modular.attribution.intervention import faithfulness, feature_masks, random_masks, run_with_features
from tl_modular.attribution.keys import key_attribution, key_contributions
from tl_modular.attribution.pruning import Pruned, influence, prune

__all__ = ["AttributionGraph", "AttributionSet", "FeatureCircuit", "Node", "Pruned", "aggregate", "attribution_graph",
           "faithfulness", "feature_masks", "feature_name", "influence", "key_attribution", "key_contributions",
           "load_graph", "prune", "random_masks", "run_with_features", "save_graph"]
