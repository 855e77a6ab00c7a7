"""Feature circuits per category: per-prompt attribution graphs aggregated over a task's prompts
(or any grouping of prompts), as :class:`~tl_modular.CircuitSet` does for routes.

A feature is a node of a graph without its position: a write direction ``L1.H2:write.d0`` or an
SAE feature ``sae:blocks.1.hook_mlp_out/F42``. In each graph a feature's **share** is its summed
indirect influence on the logit (over positions; :func:`~tl_modular.attribution.influence`) divided
by the influence of all the graph's sources (embeddings, errors, biases included), so the shares
of one prompt sum to at most 1. A category's circuit holds the features kept by
:func:`~tl_modular.attribution.prune` in at least ``min_frequency`` of its prompts, strongest mean
share first, and the edges among them (and into the logit) with their weights summed over
positions and averaged over prompts.

Schema of ``attribution_set.json`` (``"schema": "tl_modular.AttributionSet"``, ``"version": 1``)::

    {"features": [name, ...],                           # the columns of every category's usage
     "settings": {"node_threshold": float, "min_frequency": float},
     "categories": [{"category": str, "features": [name, ...],    # the circuit, strongest first
                     "share": [[name, float], ...],     # mean share of every feature seen
                     "frequency": [[name, float], ...], # fraction of prompts whose pruned graph keeps it
                     "edges": [[source, target, mean weight, frequency], ...],   # target may be "logit"
                     "error_share": float, "n_examples": int,
                     "usage": [[float, ...], ...]}]}   # [examples, features]: each prompt's shares

>>> graphs = {n: tlm.attribution_graph(model, make(16), units=comp) for n, make in tasks.items()}  # doctest: +SKIP
>>> features = tlm.attribution.aggregate(graphs)                                          # doctest: +SKIP
>>> features.shared(), features.specific(), features.similarity(), features.example_clusters()  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tl_modular._io import SCHEMA_VERSION, read_versioned_json, reading, write_json
from tl_modular._stats import adjusted_rand_index, kmeans
from tl_modular.attribution.graph import AttributionGraph, Node
from tl_modular.attribution.pruning import Pruned, prune

__all__ = ["AttributionSet", "FeatureCircuit", "aggregate", "feature_name"]

_SCHEMA = "tl_modular.AttributionSet"
_FILE = "attribution_set.json"
_WRITER = "AttributionSet.save (tlm.attribution.aggregate)"


def feature_name(node: Node) -> str:
    """A feature node's name without its position: ``"L1.H2:write.d0"``, ``"sae:blocks.1.hook_mlp_out/F42"``."""
    if node.kind != "feature":
        raise ValueError(f"only feature nodes have a feature name, got a {node.kind} node ({node.name})")
    return node.name.rsplit("@", 1)[0]


@dataclass
class FeatureCircuit:
    """One category's feature circuit (see the module docs)."""

    category: str
    features: list[str]                      # kept in >= min_frequency of the prompts, strongest first
    share: dict[str, float]                  # mean share of the logit's influence, every feature seen
    frequency: dict[str, float]              # fraction of the prompts whose pruned graph keeps the feature
    edges: list[tuple[str, str, float, float]]   # (source, target or "logit", mean weight, frequency)
    error_share: float                       # mean share of the error nodes: what the units do not explain
    n_examples: int
    usage: np.ndarray                        # [examples, features of the set]: each prompt's shares

    @property
    def size(self) -> int:
        return len(self.features)

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "features": self.features, "share": [[k, v] for k, v in self.share.items()],
                "frequency": [[k, v] for k, v in self.frequency.items()], "edges": [list(e) for e in self.edges],
                "error_share": self.error_share, "n_examples": self.n_examples,
                "usage": np.round(self.usage, 8).tolist()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], n_features: int) -> FeatureCircuit:
        usage = np.asarray(d["usage"], dtype=float).reshape(-1, n_features)
        if len(usage) != d["n_examples"]:
            raise ValueError(f"category {d['category']!r}: usage has {len(usage)} rows for {d['n_examples']} examples")
        return cls(category=d["category"], features=list(d["features"]), share={k: float(v) for k, v in d["share"]},
                   frequency={k: float(v) for k, v in d["frequency"]},
                   edges=[(s, t, float(w), float(f)) for s, t, w, f in d["edges"]],
                   error_share=float(d["error_share"]), n_examples=int(d["n_examples"]), usage=usage)


class AttributionSet(Mapping[str, FeatureCircuit]):
    """Feature circuits by category, with what they share (build it with :func:`aggregate`)."""

    def __init__(self, circuits: Mapping[str, FeatureCircuit], features: Sequence[str],
                 settings: Mapping[str, float] | None = None) -> None:
        self._circuits = dict(circuits)
        self.features = list(features)       # the columns of every circuit's usage
        self.settings = dict(settings or {})

    def __getitem__(self, name: str) -> FeatureCircuit:
        return self._circuits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._circuits)

    def __len__(self) -> int:
        return len(self._circuits)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {c.size} features over {c.n_examples} prompts" for n, c in self.items())
        return f"AttributionSet({parts})"

    def shared(self) -> set[str]:
        """Features in every category's circuit."""
        sets = [set(c.features) for c in self.values()]
        return set.intersection(*sets) if sets else set()

    def specific(self) -> dict[str, set[str]]:
        """Features in one category's circuit and no other."""
        return {name: set(c.features) - set().union(*(set(o.features) for n, o in self.items() if n != name))
                for name, c in self.items()}

    def similarity(self, kind: Literal["jaccard", "cosine"] = "jaccard") -> tuple[list[str], np.ndarray]:
        """``(names, matrix)``: pairwise Jaccard similarity of the circuits' feature sets, or
        (``kind="cosine"``) the cosine of their mean share vectors over all features."""
        names = list(self)
        if kind == "cosine":
            x = np.stack([self[n].usage.mean(0) for n in names])
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
            return names, x @ x.T
        if kind != "jaccard":
            raise ValueError(f"kind must be 'jaccard' or 'cosine', got {kind!r}")
        m = np.eye(len(names))
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                a, b = set(self[names[i]].features), set(self[names[j]].features)
                m[i, j] = m[j, i] = len(a & b) / max(len(a | b), 1)
        return names, m

    def example_clusters(self, k: int | None = None, *, seed: int = 0) -> dict[str, Any]:
        """Cluster every prompt of every category by its feature shares (k-means on the rows of
        ``usage``, square-rooted and standardized per feature as in
        :meth:`CircuitSet.example_clusters <tl_modular.CircuitSet.example_clusters>`; ``k`` defaults to
        the number of categories).

        Returns ``{"labels": {category: [cluster per prompt]}, "k", "purity", "ari"}``.
        """
        x = np.sqrt(np.clip(np.concatenate([c.usage for c in self.values()]), 0, None))
        x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
        truth = np.concatenate([np.full(len(c.usage), i) for i, c in enumerate(self.values())])
        k = len(self) if k is None else int(k)
        if not 1 <= k <= len(x):
            raise ValueError(f"k must lie in [1, {len(x)}] (the number of prompts), got {k}")
        labels = kmeans(x, k, np.random.default_rng(seed))
        majority = sum(np.bincount(truth[labels == j]).max() for j in np.unique(labels))
        out, start = {}, 0
        for name, c in self.items():
            out[name] = labels[start:start + len(c.usage)].tolist()
            start += len(c.usage)
        return {"labels": out, "k": k, "purity": float(majority / len(x)), "ari": adjusted_rand_index(truth, labels)}

    def plot(self, ax: Any = None, *, top: int = 30) -> Any:
        """Heat map of the mean share of the ``top`` features (by their largest mean share) per category."""
        import matplotlib.pyplot as plt

        names = list(self)
        mean = np.stack([self[n].usage.mean(0) for n in names])
        order = np.argsort(-mean.max(0), kind="stable")[:top]
        if ax is None:
            _, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(order)), 1 + 0.5 * len(names)))
        ax.imshow(mean[:, order], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(order)), [self.features[i] for i in order], rotation=90, fontsize=6)
        return ax

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/attribution_set.json`` (atomically; schema in this module's docs)."""
        directory = Path(directory)
        write_json(directory / _FILE, {"schema": _SCHEMA, "version": SCHEMA_VERSION, "features": self.features,
                                       "settings": self.settings,
                                       "categories": [c.to_json() for c in self.values()]})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AttributionSet:
        """Read what :meth:`save` wrote; a damaged or foreign file raises ``ArtifactError``."""
        meta = read_versioned_json(directory, _FILE, _SCHEMA, _WRITER, required=("features", "categories"))
        with reading(Path(directory) / _FILE, _WRITER):
            n = len(meta["features"])
            return cls({d["category"]: FeatureCircuit.from_json(d, n) for d in meta["categories"]}, meta["features"],
                       meta.get("settings", {}))


# --- building -------------------------------------------------------------------------------------

@dataclass
class _Prompt:
    share: dict[str, float]
    kept: set[str]
    edges: dict[tuple[str, str], float]
    error_share: float


def _one(item: AttributionGraph | Pruned, node_threshold: float) -> _Prompt:
    pruned = item if isinstance(item, Pruned) else prune(item, node_threshold=node_threshold, edge_threshold=1.0)
    graph = pruned.graph
    infl = pruned.node_influence.double()
    total = float(infl.sum()) or 1.0                     # the logit's own entry is 0
    names: list[str | None] = [feature_name(n) if n.kind == "feature" else None for n in graph.nodes]
    share: dict[str, float] = {}
    error = 0.0
    for i, (node, v) in enumerate(zip(graph.nodes, (infl / total).tolist(), strict=True)):
        if names[i] is not None:
            share[names[i]] = share.get(names[i], 0.0) + v
        elif node.kind == "error":
            error += v
    kept = {names[i] for i in pruned.nodes.nonzero()[:, 0].tolist() if names[i] is not None}
    a = graph.adjacency.coalesce()
    idx, val = a.indices()[:, pruned.edges], a.values()[pruned.edges]
    edges: dict[tuple[str, str], float] = {}
    names[graph.logit] = "logit"
    for (t, s), w in zip(idx.T.tolist(), val.tolist(), strict=True):
        if names[s] is not None and names[t] is not None:
            edges[names[s], names[t]] = edges.get((names[s], names[t]), 0.0) + w
    return _Prompt(share, kept, edges, error)


def aggregate(graphs: Mapping[str, Sequence[AttributionGraph | Pruned]] | Sequence[AttributionGraph | Pruned], *,
              by: Callable[[AttributionGraph], str] | None = None, node_threshold: float = 0.8,
              min_frequency: float = 0.5) -> AttributionSet:
    """Feature circuits per category from per-prompt attribution graphs.

    Args:
        graphs: ``{category: [graph or pruned graph, ...]}`` (e.g. one
            :func:`~tl_modular.attribution_graph` call per task), or one list of graphs that ``by``
            sorts into categories (a list without ``by`` is the single category ``"all"``).
        by: ``graph -> category`` for a list: any token category, e.g. the answer token
            ``lambda g: str(g.target["answers"][0])``.
        node_threshold: Graphs (not already pruned) are pruned with this node threshold (edge
            threshold 1) to decide which features a prompt keeps.
        min_frequency: A feature belongs to a category's circuit when at least this fraction of its
            prompts keep it.

    Raises:
        TypeError / ValueError: an empty category, something other than graphs, a fraction
            outside ``(0, 1]``.

    >>> s = tlm.attribution.aggregate({"induction": g_ind, "sorting": g_sort})   # doctest: +SKIP
    >>> s["induction"].features[:5], s.shared(), s.similarity()                   # doctest: +SKIP
    """
    for label, t in (("node_threshold", node_threshold), ("min_frequency", min_frequency)):
        if not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"{label} must be a fraction in (0, 1], got {t!r}")
    if isinstance(graphs, AttributionGraph | Pruned):
        raise TypeError("graphs must be a list of graphs or a {category: [graphs]} mapping, got one graph; "
                        "wrap it in a list")
    if isinstance(graphs, Mapping):
        if by is not None:
            raise ValueError("by sorts a list of graphs into categories; graphs is already a mapping")
        groups = {str(k): list(v) for k, v in graphs.items()}
    else:
        groups = {}
        for g in graphs:
            key = "all" if by is None else str(by(g.graph if isinstance(g, Pruned) else g))
            groups.setdefault(key, []).append(g)
    if not groups:
        raise ValueError("graphs is empty: pass at least one category with one graph")
    for name, items in groups.items():
        if not items:
            raise ValueError(f"category {name!r} has no graphs")
        bad = [type(x).__name__ for x in items if not isinstance(x, AttributionGraph | Pruned)]
        if bad:
            raise TypeError(f"category {name!r} holds {bad[0]}, not AttributionGraph or Pruned (from "
                            "tlm.attribution_graph / tlm.attribution.prune)")
    prompts = {name: [_one(x, node_threshold) for x in items] for name, items in groups.items()}
    features = sorted(set().union(*(p.share for ps in prompts.values() for p in ps)))
    column = {f: j for j, f in enumerate(features)}
    circuits = {}
    for name, ps in prompts.items():
        n = len(ps)
        usage = np.zeros((n, len(features)))
        for row, p in enumerate(ps):
            for f, v in p.share.items():
                usage[row, column[f]] = v
        mean = usage.mean(0)
        seen = [features[j] for j in np.argsort(-mean, kind="stable") if any(features[j] in p.share for p in ps)]
        frequency = {f: sum(f in p.kept for p in ps) / n for f in seen}
        chosen = [f for f in seen if frequency[f] >= min_frequency]
        inside = set(chosen) | {"logit"}
        weights: dict[tuple[str, str], list[float]] = {}
        for p in ps:
            for (s, t), w in p.edges.items():
                if s in inside and t in inside:
                    weights.setdefault((s, t), []).append(w)
        edges = sorted(((s, t, sum(w) / n, len(w) / n) for (s, t), w in weights.items()),
                       key=lambda e: -abs(e[2]))
        circuits[name] = FeatureCircuit(category=name, features=chosen, share={f: float(mean[column[f]]) for f in seen},
                                        frequency=frequency, edges=edges,
                                        error_share=float(np.mean([p.error_share for p in ps])), n_examples=n,
                                        usage=usage)
    return AttributionSet(circuits, features, {"node_threshold": node_threshold, "min_frequency": min_frequency})
