"""Exports and pictures of a ChannelGraph: GraphML, Graphviz DOT, a matplotlib plot by layer."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx

from tl_modular._io import _atomic

if TYPE_CHECKING:      # annotations only: graph.graph imports this module
    from tl_modular.graph import ChannelGraph


def write_graphml(graph: ChannelGraph, path: Path) -> Path:
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


def write_dot(graph: ChannelGraph, path: Path, *, weight: str, modules: Sequence[frozenset] | None) -> Path:
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


def pyplot(headless: bool) -> Any:
    import matplotlib

    if headless:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


class Layout:
    """Channels by stream position (embeddings left, logits right), heads stacked in their column."""

    def __init__(self, graph: ChannelGraph, names: list[str]) -> None:
        self.nodes = graph.nx.nodes
        self.n_layers = max((d["layer"] for _, d in self.nodes(data=True) if d["kind"] != "port"), default=0)
        self.columns: dict[float, list[str]] = {}
        for n in names:
            self.columns.setdefault(self.x(n), []).append(n)
        self.pos = {}
        for x, column in self.columns.items():
            column.sort(key=lambda n: (self.nodes[n].get("head", -1), n))
            for i, n in enumerate(column):
                self.pos[n] = (x, i - (len(column) - 1) / 2)

    def x(self, n: str) -> float:
        return self.n_layers * 2 + 0.5 if n == "unembed" else self.nodes[n]["order"]

    def size(self) -> tuple[float, float]:
        return max(6.0, 1.2 * len(self.columns)), max(3.5, 0.6 * max(len(v) for v in self.columns.values()))

    def draw(self, ax: Any, edges: list[tuple[str, str, float, Any]], colors: dict[str, Any], title: str) -> None:
        """``edges``: ``(u, v, width, color)``; ``colors``: node fill (white when absent)."""
        from matplotlib.patches import FancyArrowPatch

        for u, v, width, color in edges:
            a, b = sorted((u, v), key=self.x)
            # arcs bend more the farther they reach, so long routes do not run through the nodes between
            rad = 0.03 * min(abs(self.x(b) - self.x(a)), 5)
            ax.add_patch(FancyArrowPatch(self.pos[a], self.pos[b], connectionstyle=f"arc3,rad={rad:.2f}",
                                         arrowstyle="-", color=color, alpha=0.6, lw=width, zorder=1))
        for n, (x, y) in self.pos.items():
            ax.scatter([x], [y], s=420, color=colors.get(n, "white"), edgecolors="black", zorder=2)
            ax.annotate(n, (x, y), ha="center", va="center", fontsize=6, zorder=3)
        ys = [y for _, y in self.pos.values()]
        ax.set_ylim(min(ys) - 1.2, max(ys) + 0.8)
        ax.set_xlim(min(self.columns) - 0.5, max(self.columns) + 0.5)
        ax.set_xticks(sorted(self.columns))
        ax.set_xticklabels(["emb" if x < 0 else "out" if x > 2 * self.n_layers else
                            f"L{int(x // 2)} {'mlp' if x % 2 else 'attn'}" for x in sorted(self.columns)], fontsize=7)
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)


def save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=path.suffix, delete=False) as tmp:
        pass
    try:
        fig.savefig(tmp.name, dpi=150, bbox_inches="tight")
        Path(tmp.name).replace(path)
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def plot(graph: ChannelGraph, path: Path | None, *, weight: str, modules: Sequence[frozenset] | None,
         top: float, ax: Any) -> Any:
    plt = pyplot(ax is None and path is not None)
    modules = graph.modules(weight=weight) if modules is None else list(modules)
    cap = graph.capacity_graph(weight, io=True)
    layout = Layout(graph, list(cap.nodes))
    if ax is None:
        _, ax = plt.subplots(figsize=layout.size())
    edges = sorted(cap.edges(data="capacity"), key=lambda e: -e[2])
    total = sum(c for _, _, c in edges) or 1.0
    kept, acc = [], 0.0
    for u, v, c in edges:
        if acc >= top * total:
            break
        kept.append((u, v, c))
        acc += c
    biggest = kept[0][2] if kept else 1.0
    cmap = plt.get_cmap("tab10" if len(modules) <= 10 else "tab20")
    colors = {n: cmap(i % cmap.N) for i, m in enumerate(modules) for n in m}
    layout.draw(ax, [(u, v, 0.3 + 5 * c / biggest, "0.35") for u, v, c in kept], colors,
                f"{len(modules)} modules; {weight} strengths; edges carrying {top:.0%} of the total")
    if path is not None:
        save_figure(ax.figure, path)
    return ax
