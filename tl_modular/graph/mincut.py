"""Gomory–Hu trees, modules cut from them, and partition statistics (graph algorithms only).

Everything here works on an undirected networkx graph whose edges carry a float ``capacity``.
Max-flow on float capacities is inexact, so both backends run on integer capacities (the floats
scaled so the largest is ``_SCALE``) and report cut values back in the original units; trees are
not unique when cut values tie, so compare pairwise min-cut values, never tree shapes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import networkx as nx
import numpy as np

Backend = Literal["auto", "networkx", "igraph"]
_SCALE = 10**9


def has_igraph() -> bool:
    try:
        import igraph  # noqa: F401
    except ImportError:
        return False
    return True


def _integer_capacities(graph: nx.Graph) -> tuple[list, dict[tuple, int], float]:
    nodes = list(graph.nodes)
    top = max((d["capacity"] for _, _, d in graph.edges(data=True)), default=0.0)
    unit = top / _SCALE if top > 0 else 1.0
    caps = {(u, v): int(round(d["capacity"] / unit)) for u, v, d in graph.edges(data=True)}
    return nodes, caps, unit


def gomory_hu_tree(graph: nx.Graph, backend: Backend = "auto") -> nx.Graph:
    """The Gomory–Hu tree of ``graph`` (edge attribute ``capacity`` >= 0): a tree on the same
    nodes whose edge ``weight`` is the min cut between its ends; the min cut between any two
    nodes is the smallest weight on their tree path.

    ``backend="auto"`` takes python-igraph's C implementation when installed, else networkx.
    """
    if graph.number_of_nodes() == 0:
        raise ValueError("the graph has no nodes")
    if any(d["capacity"] < 0 or not math.isfinite(d["capacity"]) for _, _, d in graph.edges(data=True)):
        raise ValueError("capacities must be finite and non-negative")
    if backend == "auto":
        backend = "igraph" if has_igraph() else "networkx"
    nodes, caps, unit = _integer_capacities(graph)
    tree = nx.Graph()
    tree.add_nodes_from(nodes)
    if len(nodes) == 1:
        return tree
    if backend == "igraph":
        if not has_igraph():
            raise ImportError("backend='igraph' needs python-igraph: pip install python-igraph")
        import igraph

        index = {n: i for i, n in enumerate(nodes)}
        g = igraph.Graph(n=len(nodes), edges=[(index[u], index[v]) for u, v in caps], directed=False)
        g.es["capacity"] = [float(c) for c in caps.values()]
        t = g.gomory_hu_tree(capacity="capacity", flow="flow")
        for e in t.es:
            tree.add_edge(nodes[e.source], nodes[e.target], weight=e["flow"] * unit)
        return tree
    if backend != "networkx":
        raise ValueError(f"backend must be 'auto', 'networkx' or 'igraph', got {backend!r}")
    g = nx.Graph()
    g.add_nodes_from(nodes)
    g.add_edges_from((u, v, {"capacity": c}) for (u, v), c in caps.items())
    if not nx.is_connected(g):
        # networkx refuses disconnected graphs; zero-capacity edges between components keep
        # the cut values (0 across components) and make it connected.
        comps = [next(iter(c)) for c in nx.connected_components(g)]
        g.add_edges_from((a, b, {"capacity": 0}) for a, b in zip(comps, comps[1:], strict=False))
    t = nx.gomory_hu_tree(g, capacity="capacity")
    for u, v, d in t.edges(data=True):
        tree.add_edge(u, v, weight=d["weight"] * unit)
    return tree


def tree_min_cut(tree: nx.Graph, u: Hashable, v: Hashable) -> float:
    """The min cut between ``u`` and ``v``: the smallest weight on their tree path."""
    path = nx.shortest_path(tree, u, v)
    return min(tree[a][b]["weight"] for a, b in zip(path, path[1:], strict=False))


def pairwise_min_cuts(tree: nx.Graph) -> dict[tuple, float]:
    """Every pair's min-cut value from a Gomory–Hu tree (one traversal per source)."""
    out = {}
    for s in tree.nodes:
        best = {s: math.inf}
        stack = [s]
        while stack:
            a = stack.pop()
            for b in tree[a]:
                if b not in best:
                    best[b] = min(best[a], tree[a][b]["weight"])
                    stack.append(b)
        for t, val in best.items():
            if t != s:
                out[(s, t)] = val
    return out


# --- modules: cutting the tree ---------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """One cut of the module hierarchy: ``parent`` separates into ``left`` and ``right`` at min-cut
    ``value`` (the capacity between the two sides of that cut in the graph)."""

    value: float
    parent: frozenset
    left: frozenset
    right: frozenset


def hierarchy(tree: nx.Graph, *, min_size: int, counted: Iterable[Hashable] | None = None) -> list[Split]:
    """Cut tree edges from the weakest up, keeping a cut when both sides hold at least ``min_size``
    ``counted`` nodes (all nodes by default). Returns the splits in the order they happen;
    after the first ``k`` splits the nodes fall into ``k + 1`` modules."""
    counted = set(tree.nodes if counted is None else counted)
    forest = tree.copy()
    splits = []
    for u, v, w in sorted(tree.edges(data="weight"), key=lambda e: (e[2], str(e[0]), str(e[1]))):
        parent = frozenset(nx.node_connected_component(forest, u))
        forest.remove_edge(u, v)
        left = frozenset(nx.node_connected_component(forest, u))
        right = parent - left
        if len(left & counted) >= min_size and len(right & counted) >= min_size:
            splits.append(Split(float(w), parent, left, right))
        else:  # too small a side: keep the edge (it can never become admissible later)
            forest.add_edge(u, v, weight=w)
    return splits


def partition_after(nodes: Iterable[Hashable], splits: Sequence[Split], k: int) -> list[frozenset]:
    """The modules after the first ``k`` splits."""
    parts = [frozenset(nodes)]
    for s in splits[:k]:
        parts.remove(s.parent)
        parts += [s.left, s.right]
    return parts


def components(tree: nx.Graph, threshold: float) -> list[frozenset]:
    """Communication components: classes whose every pairwise min cut exceeds ``threshold``
    (the tree's connected parts once edges of weight <= threshold are removed)."""
    kept = nx.Graph()
    kept.add_nodes_from(tree.nodes)
    kept.add_edges_from((u, v) for u, v, w in tree.edges(data="weight") if w > threshold)
    return [frozenset(c) for c in nx.connected_components(kept)]


# --- partition statistics ----------------------------------------------------------------------

def partition_scores(graph: nx.Graph, parts: Sequence[frozenset]) -> dict[str, float]:
    """``crossing`` (fraction of capacity between modules), ``ncut`` (Σ cut(A)/vol(A)) and
    Newman's weighted modularity ``Q`` of a partition of ``graph``'s nodes."""
    label = {n: i for i, p in enumerate(parts) for n in p}
    total = 0.0
    inside = np.zeros(len(parts))
    vol = np.zeros(len(parts))
    for u, v, c in graph.edges(data="capacity"):
        total += c
        vol[label[u]] += c
        vol[label[v]] += c
        if label[u] == label[v]:
            inside[label[u]] += c
    if total <= 0:
        return {"crossing": 0.0, "ncut": 0.0, "Q": 0.0}
    cut = vol - 2 * inside
    with np.errstate(divide="ignore", invalid="ignore"):
        ncut = float(np.where(vol > 0, cut / vol, 0.0).sum())
    q = float((inside / total - (vol / (2 * total)) ** 2).sum())
    return {"crossing": float(1 - inside.sum() / total), "ncut": ncut, "Q": q}


def best_level(graph: nx.Graph, splits: Sequence[Split]) -> int:
    """How many splits maximize Newman's Q (0 when no split raises it above the whole graph's 0)."""
    nodes = list(graph.nodes)
    best_k, best_q = 0, 0.0
    for k in range(1, len(splits) + 1):
        q = partition_scores(graph, partition_after(nodes, splits, k))["Q"]
        if q > best_q + 1e-12:
            best_k, best_q = k, q
    return best_k


def find_modules(graph: nx.Graph, *, min_size: int, counted: Iterable[Hashable] | None = None,
                 n_modules: int | None = None, max_cut: float | None = None,
                 backend: Backend = "auto", clamp: bool = False) -> tuple[list[frozenset], list[Split], nx.Graph]:
    """(modules, hierarchy, Gomory–Hu tree): cut the tree's weakest admissible edges, as many as
    ``n_modules - 1``, or all below ``max_cut``, or (by default) the number that maximizes Q.

    ``n_modules`` above what the tree admits (every side keeping ``min_size``) is an error naming
    the maximum, unless ``clamp`` (null graphs: each finds as many as it can, up to ``n_modules``)."""
    if n_modules is not None and max_cut is not None:
        raise ValueError("choose modules with at most one of n_modules= or max_cut=")
    tree = gomory_hu_tree(graph, backend)
    splits = hierarchy(tree, min_size=min_size, counted=counted)
    if n_modules is not None:
        if n_modules < 1:
            raise ValueError(f"n_modules must be >= 1, got {n_modules}")
        if n_modules - 1 > len(splits) and not clamp:
            raise ValueError(f"n_modules={n_modules} is more than this graph can give: at most {len(splits) + 1} "
                             f"modules of at least min_size={min_size} channels each; ask for fewer, or lower min_size")
        k = min(n_modules - 1, len(splits))
    elif max_cut is not None:
        k = sum(s.value <= max_cut for s in splits)
    else:
        k = best_level(graph, splits)
    return partition_after(graph.nodes, splits, k), splits, tree
