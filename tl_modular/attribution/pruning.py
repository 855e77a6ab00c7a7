"""Pruning an attribution graph to the nodes and edges that carry the logit's influence.

As in circuit-tracer: normalise each target's incoming edges by their absolute sum (``Â``), take
every node's indirect influence on the logit ``e Σₖ Âᵏ`` (``= e ((I - Â)⁻¹ - I)``; the graph is a
DAG, so the series ends after ``2 n_layers + 1`` steps), keep the feature nodes that hold
``node_threshold`` of the total feature influence, then the edges (scored by their normalised
weight times their target's influence) that hold ``edge_threshold`` of the total. Embedding,
error and bias nodes are never pruned as nodes (they carry no intervention), only their edges.

>>> kept = tlm.attribution.prune(graph, node_threshold=0.8, edge_threshold=0.98)  # doctest: +SKIP
>>> kept.features()                                                              # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tl_modular.attribution.graph import AttributionGraph

__all__ = ["Pruned", "influence", "prune"]


def _normalised(adjacency: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    a = adjacency.coalesce()
    idx, val = a.indices(), a.values().abs()
    if keep is not None:
        ok = keep[idx[0]] & keep[idx[1]]
        idx, val = idx[:, ok], val[ok]
    total = torch.zeros(a.shape[0], dtype=val.dtype).index_add_(0, idx[0], val)
    val = val / total[idx[0]].clamp_min(torch.finfo(val.dtype).tiny)
    return torch.sparse_coo_tensor(idx, val, a.shape, check_invariants=False).coalesce()


def influence(graph: AttributionGraph, keep: torch.Tensor | None = None, *,
              normalised: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]``: each node's indirect influence on the logit (``e Σ_{k≥1} Âᵏ``), over the nodes in
    ``keep`` (all by default). The logit node's own entry is 0."""
    if normalised is None:
        normalised = _normalised(graph.adjacency, keep)
    a = normalised.t().coalesce()                            # v ↦ v Â as Âᵀ v
    v = torch.zeros(len(graph), dtype=a.dtype)
    v[graph.logit] = 1.0
    total = torch.zeros_like(v)
    for _ in range(len(graph)):                              # a DAG: ends after its depth
        v = torch.sparse.mm(a, v[:, None])[:, 0]
        if not v.any():
            break
        total += v
    return total


@dataclass
class Pruned:
    """The kept part of a graph: ``nodes`` ``[n]`` and ``edges`` ``[nnz]`` boolean masks (edges in
    the order of ``graph.adjacency.coalesce()``), plus the influence used."""

    graph: AttributionGraph
    nodes: torch.Tensor
    edges: torch.Tensor
    node_influence: torch.Tensor

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    @property
    def edge_fraction(self) -> float:
        """Kept edges over all edges of the graph."""
        return self.n_edges / max(1, self.edges.numel())

    def features(self) -> list[str]:
        """Names of the kept feature nodes."""
        return [n.name for n, k in zip(self.graph.nodes, self.nodes.tolist(), strict=True) if k and n.kind == "feature"]


def _cumulative_keep(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the highest scores until their sum reaches ``threshold`` of the total (the crossing one too)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    total = scores.sum()
    if scores.numel() == 0 or total <= 0:
        return keep
    order = scores.argsort(descending=True, stable=True)
    cum = scores[order].cumsum(0) / total
    n = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype))) + 1
    keep[order[: min(n, scores.numel())]] = True
    keep &= scores > 0
    return keep


def prune(graph: AttributionGraph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the feature nodes holding ``node_threshold`` of the logit's influence, then the edges
    holding ``edge_threshold`` of the edge influence among the kept nodes.

    Raises:
        ValueError: a threshold outside ``(0, 1]``.
    """
    for label, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"{label} must be a fraction in (0, 1], got {t!r}")
    feature = graph.mask("feature")
    full_norm = _normalised(graph.adjacency)
    infl = influence(graph, normalised=full_norm)
    keep_nodes = ~feature
    keep_nodes |= _cumulative_keep(torch.where(feature, infl, 0.0), node_threshold) if node_threshold < 1 else feature
    # edge scores on the node-pruned graph: normalised weight × (influence of the target + 1 for the logit)
    a = full_norm if node_threshold >= 1 else _normalised(graph.adjacency, keep_nodes)
    infl_kept = infl.clone() if node_threshold >= 1 else influence(graph, normalised=a)
    infl_kept[graph.logit] = 1.0
    score_kept = a.values() * infl_kept[a.indices()[0]]
    full = graph.adjacency.coalesce()
    # map kept-graph edges back onto the full edge list (both coalesced: sorted by (row, col))
    n = len(graph)
    key_full = full.indices()[0] * n + full.indices()[1]
    key_kept = a.indices()[0] * n + a.indices()[1]
    score = torch.zeros(key_full.numel(), dtype=score_kept.dtype)
    score[torch.searchsorted(key_full, key_kept)] = score_kept
    edges = _cumulative_keep(score, edge_threshold) if edge_threshold < 1 else score > 0
    # a feature node survives only with a kept edge out of it (towards the logit) and into it
    touched_out = torch.zeros(n, dtype=torch.bool)
    touched_out[full.indices()[1][edges]] = True
    nodes = keep_nodes & (touched_out | ~feature)
    nodes[graph.logit] = True
    return Pruned(graph=graph, nodes=nodes, edges=edges & nodes[full.indices()[0]] & nodes[full.indices()[1]],
                  node_influence=infl)
