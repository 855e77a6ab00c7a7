"""Exports and pictures of a ChannelGraph: GraphML, Graphviz DOT, a matplotlib plot by layer."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx

from tl_modular._io import _atomic


def write_graphml(graph: Any, path: Path) -> Path:
    g = nx.DiGraph()
    # GraphML holds scalars only: drop missing values, write infinities as a large order
    for n, d in graph.nx.nodes(data=True):
        g.add_node(n, **{k: (1e9 if isinstance(v, float) and math.isinf(v) else v)
                         for k, v in d.items() if v is not None})
    g.add_edges_from((u, v, {k: x for k, x in d.items() if x is not None}) for u, v, d in graph.nx.edges(data=True))
    _atomic(path, lambda tmp: nx.write_graphml(g, tmp))
    return path


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_dot(graph: Any, path: Path, *, weight: str, modules: Sequence[frozenset] | None) -> Path:
    modules = graph.modules(weight=weight) if modules is None else list(modules)
    cap = graph.capacity_graph(weight, io=True)
    top = max((c for _, _, c in cap.edges(data="capacity")), default=1.0) or 1.0
    lines = ["digraph channels {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    placed = set()
    for i, m in enumerate(modules):
        lines.append(f"  subgraph cluster_{i} {{ label={_quote(f'module {i}')};")
        lines += [f"    {_quote(n)};" for n in sorted(m, key=lambda n: graph.nx.nodes[n]["order"])]
        lines.append("  }")
        placed |= set(m)
    lines += [f"  {_quote(n)};" for n in cap.nodes if n not in placed]
    order = {n: graph.nx.nodes[n]["order"] for n in cap.nodes}
    for u, v, c in cap.edges(data="capacity"):
        a, b = (u, v) if order[u] <= order[v] else (v, u)  # draw along the stream
        lines.append(f"  {_quote(a)} -> {_quote(b)} [penwidth={0.3 + 4 * c / top:.3f}, weight={c:.6g}];")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    _atomic(path, lambda tmp: Path(tmp).write_text(text))
    return path


def plot(graph: Any, path: Path | None, *, weight: str, modules: Sequence[frozenset] | None,
         top: float, ax: Any) -> Any:
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    modules = graph.modules(weight=weight) if modules is None else list(modules)
    cap = graph.capacity_graph(weight, io=True)
    label = {n: i for i, m in enumerate(modules) for n in m}
    nodes = graph.nx.nodes
    n_layers = max((d["layer"] for _, d in nodes(data=True) if d["kind"] not in ("port",)), default=0)

    def x_of(n: str) -> float:
        return n_layers * 2 + 0.5 if n == "unembed" else nodes[n]["order"]

    columns: dict[float, list[str]] = {}
    for n in cap.nodes:
        columns.setdefault(x_of(n), []).append(n)
    pos = {}
    for x, names in columns.items():
        names.sort(key=lambda n: (nodes[n].get("head", -1), n))
        for i, n in enumerate(names):
            pos[n] = (x, i - (len(names) - 1) / 2)
    if ax is None:
        height = max(3.5, 0.6 * max(len(v) for v in columns.values()))
        _, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(columns)), height))
    edges = sorted(cap.edges(data="capacity"), key=lambda e: -e[2])
    total = sum(c for _, _, c in edges) or 1.0
    kept, acc = [], 0.0
    for u, v, c in edges:
        if acc >= top * total:
            break
        kept.append((u, v, c))
        acc += c
    biggest = kept[0][2] if kept else 1.0
    from matplotlib.patches import FancyArrowPatch

    for u, v, c in kept:
        a, b = sorted((u, v), key=x_of)
        # arcs bend more the farther they reach, so long routes do not run through the nodes between
        rad = 0.03 * min(abs(x_of(b) - x_of(a)), 5)
        ax.add_patch(FancyArrowPatch(pos[a], pos[b], connectionstyle=f"arc3,rad={rad:.2f}", arrowstyle="-",
                                     color="0.35", alpha=0.55, lw=0.3 + 5 * c / biggest, zorder=1))
    cmap = plt.get_cmap("tab10" if len(modules) <= 10 else "tab20")
    for n, (x, y) in pos.items():
        color = cmap(label[n] % cmap.N) if n in label else "white"
        ax.scatter([x], [y], s=420, color=color, edgecolors="black", zorder=2)
        ax.annotate(n, (x, y), ha="center", va="center", fontsize=6, zorder=3)
    ys = [y for _, y in pos.values()]
    ax.set_ylim(min(ys) - 1.2, max(ys) + 0.8)
    ax.set_xlim(min(columns) - 0.5, max(columns) + 0.5)
    ax.set_xticks(sorted(columns))
    ax.set_xticklabels(["emb" if x < 0 else "out" if x > 2 * n_layers else
                        f"L{int(x // 2)} {'mlp' if x % 2 else 'attn'}" for x in sorted(columns)], fontsize=7)
    ax.set_yticks([])
    ax.set_title(f"{len(modules)} modules; {weight} strengths; edges carrying {top:.0%} of the total")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=path.suffix, delete=False) as tmp:
            pass
        try:
            ax.figure.savefig(tmp.name, dpi=150, bbox_inches="tight")
            Path(tmp.name).replace(path)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    return ax
