"""Attribution graphs: nodes, the sparse matrix of direct effects between them, and their JSON form.

Built by :func:`tl_modular.attribution_graph` (``build.py``); the JSON is written atomically.

Schema (``"schema": "attribution_graph"``, ``"version": 1``)::

    {
      "schema": "attribution_graph", "version": 1,
      "tokens": [int, ...],                               # the prompt
      "target": {"positions": [...], "answers": [...], "wrong_answers": [...]},  # the logit node
      "info": {"n_layers": int, "d_model": int},
      "nodes": [[kind, channel, index, position, stream, activation, bias, pre_activation, sae], ...],
          # kind: embed | pos_embed | bias | error | feature | logit; channel/index/position may be null;
          # sae: the hook of an SAE feature's SAE (index = its feature index), else null;
          # node i is row and column i of the adjacency; the logit node is the last
      "edges": {"target": [int, ...], "source": [int, ...], "weight": [float, ...]}
          # weight = direct effect of nodes[source] on nodes[target]; only the edges saved
          # (all of them, or a pruned graph's kept edges)
    }

>>> graph.save("graph.json"); tlm.attribution.AttributionGraph.load("graph.json")   # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_modular._io import SCHEMA_VERSION, read_versioned_json, reading, write_json
from tl_modular._names import parse

__all__ = ["NODE_KINDS", "AttributionGraph", "Node", "load_graph", "save_graph"]

NODE_KINDS = ("embed", "pos_embed", "bias", "error", "feature", "logit")


@dataclass(frozen=True)
class Node:
    """One node: ``kind`` (see the module doc), ``channel`` (or ``None``), ``index`` (a feature's
    write direction), ``position``, the ``stream`` point where it writes (``0`` embeddings,
    ``2l + 1`` layer ``l``'s attention, ``2l + 2`` its MLP; the logit reads at ``2 n_layers + 1``), and
    for an SAE feature the ``sae``'s hook (``index`` is then the feature's index in the SAE)."""

    kind: str
    channel: str | None
    index: int | None
    position: int | None
    stream: int
    sae: str | None = None   # the hook of the SAE a feature belongs to; None for a write direction

    @property
    def name(self) -> str:
        if self.kind == "logit":
            return "logit"
        if self.kind == "feature" and self.sae is not None:
            return f"sae:{self.sae}/F{self.index}@{self.position}"
        if self.kind == "feature":
            return f"{replace(parse(self.channel), kind='direction', path='write', index=self.index)}@{self.position}"
        if self.kind == "error":
            return f"{self.channel}:error@{self.position}"
        if self.kind == "bias":
            return f"bias:{self.stream}@{self.position}"
        return f"{self.kind}@{self.position}"


@dataclass
class AttributionGraph:
    """A per-prompt attribution graph (build it with :func:`attribution_graph`).

    Attributes:
        nodes: Every node; index ``i`` is row/column ``i`` of :attr:`adjacency`.
        adjacency: ``[n, n]`` sparse (COO) matrix, ``adjacency[t, s]`` = direct effect of source
            ``s`` on target ``t``.
        activation: ``[n]`` each node's value in the clean run, the coefficient of its write
            (features: ``a_j``; the logit node: the metric; embeddings, errors, biases: 1 — their
            whole write is the edge).
        pre_activation: ``[n]`` each target's value before its own nonlinearity: equal to
            ``activation`` for write directions and the logit, the encoder's pre-activation for
            SAE features (whose activation is ``relu`` of it). Incoming edges + ``bias`` sum to it.
        bias: ``[n]`` each target's constant term in the frozen model (0 for sources).
        tokens: ``[pos]`` the prompt.
        target: ``{"positions", "answers", "wrong_answers"}`` defining the logit node.
    """

    nodes: list[Node]
    adjacency: torch.Tensor
    activation: Float[torch.Tensor, " n"]
    pre_activation: Float[torch.Tensor, " n"]
    bias: Float[torch.Tensor, " n"]
    tokens: Int[torch.Tensor, " pos"]
    target: dict[str, list[int]]
    info: dict[str, Any] = field(default_factory=dict)
    #: ``[n, d_model]`` each source's write into the residual stream (the logit's row is 0); kept
    #: from the build for key attribution, not saved to JSON.
    writes: Float[torch.Tensor, "n d_model"] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return (f"AttributionGraph({len(self.nodes)} nodes, {self.adjacency._nnz()} edges, "
                f"{len(self.tokens)} tokens, logit {float(self.activation[self.logit]):.4g})")

    @property
    def logit(self) -> int:
        """Index of the logit node (the last one)."""
        return len(self.nodes) - 1

    def index(self, name: str) -> int:
        """Index of the node called ``name`` (e.g. ``"L1.H2:write.d0@12"``)."""
        lookup = self.info.setdefault("_lookup", {n.name: i for i, n in enumerate(self.nodes)})
        try:
            return lookup[name]
        except KeyError:
            raise KeyError(f"no node {name!r} in this graph; names look like 'L1.H2:write.d0@12', "
                           "'L0.MLP:error@3', 'embed@0', 'logit'") from None

    def kinds(self) -> list[str]:
        return [n.kind for n in self.nodes]

    def mask(self, *kinds: str) -> torch.Tensor:
        """Boolean ``[n]``: nodes of these kinds."""
        return torch.tensor([n.kind in kinds for n in self.nodes])

    def dense(self) -> torch.Tensor:
        """The adjacency as a dense ``[n, n]`` tensor (small graphs only)."""
        return self.adjacency.to_dense()

    def incoming(self) -> Float[torch.Tensor, " n"]:
        """Sum of every node's incoming edges."""
        a = self.adjacency.coalesce()
        out = torch.zeros(len(self.nodes), dtype=a.dtype)
        return out.index_add_(0, a.indices()[0], a.values())

    def completeness(self) -> float:
        """Largest relative gap ``|Σ incoming + bias - pre_activation| / |pre_activation|`` over target
        nodes (features and logit; the denominator floored at 1e-3 of the largest); 0 up to rounding
        by construction of the frozen model."""
        t = self.mask("feature", "logit")
        value = self.pre_activation[t]
        gap = (self.incoming()[t] + self.bias[t] - value).abs()
        scale = value.abs().clamp_min(value.abs().max() * 1e-3)
        return float((gap / scale).max()) if t.any() else 0.0

    def to_networkx(self) -> Any:
        """A ``networkx.DiGraph`` (source → target) with node attributes ``kind``, ``channel``,
        ``index``, ``position``, ``stream``, ``activation`` and edge attribute ``weight``."""
        import networkx as nx

        g = nx.DiGraph()
        for i, n in enumerate(self.nodes):
            g.add_node(n.name, kind=n.kind, channel=n.channel, index=n.index, position=n.position,
                       stream=n.stream, sae=n.sae, activation=float(self.activation[i]),
                       pre_activation=float(self.pre_activation[i]), bias=float(self.bias[i]))
        a = self.adjacency.coalesce()
        names = [n.name for n in self.nodes]
        for (t, s), w in zip(a.indices().T.tolist(), a.values().tolist(), strict=True):
            g.add_edge(names[s], names[t], weight=w)
        return g

    def save(self, path: Any, *, pruned: Any = None) -> Any:
        """Write the graph as JSON, atomically (schema in this module's docs); with
        ``pruned`` (from :func:`~tl_modular.attribution.prune`) only its kept edges."""
        return save_graph(self, path, pruned=pruned)

    @classmethod
    def load(cls, path: Any) -> AttributionGraph:
        return load_graph(path)

    def plot(self, ax: Any = None, *, keep: torch.Tensor | None = None, top: int = 40) -> Any:
        """Draw the ``top`` nodes by |edge weight| mass (or those in ``keep``) layered by stream point
        and position (matplotlib)."""
        import matplotlib.pyplot as plt
        import networkx as nx

        a = self.adjacency.coalesce()
        mass = torch.zeros(len(self.nodes), dtype=a.dtype)
        mass.index_add_(0, a.indices()[1], a.values().abs())
        mass[self.logit] = math.inf
        chosen = keep if keep is not None else torch.zeros(len(self.nodes), dtype=torch.bool)
        if keep is None:
            chosen[mass.argsort(descending=True)[:top]] = True
        names = [n.name for n in self.nodes]
        g = self.to_networkx().subgraph([names[i] for i in chosen.nonzero()[:, 0].tolist()])
        pos = {names[i]: (self.nodes[i].position if self.nodes[i].position is not None else len(self.tokens),
                          self.nodes[i].stream + 0.3 * ((i * 7919) % 5) / 5) for i in chosen.nonzero()[:, 0].tolist()}
        if ax is None:
            _, ax = plt.subplots(figsize=(10, 6))
        widths = [min(4.0, 0.5 + abs(d["weight"])) for *_, d in g.edges(data=True)]
        nx.draw_networkx(g, pos, ax=ax, node_size=60, font_size=6, width=widths, arrows=True)
        ax.set_xlabel("position")
        ax.set_ylabel("stream point")
        return ax


SCHEMA = "attribution_graph"
_WRITER = "AttributionGraph.save (tlm.attribution_graph)"


def save_graph(graph: AttributionGraph, path: str | os.PathLike, *, pruned: Any = None) -> Path:
    """Write ``graph`` (only ``pruned``'s kept edges when given: a ``Pruned`` from ``prune(graph)``,
    not imported here, since pruning builds on this module) to the JSON file ``path``."""
    a = graph.adjacency.coalesce()
    idx, val = a.indices(), a.values()
    if pruned is not None:
        if pruned.graph is not graph:
            raise ValueError("pruned must come from prune(graph) of this graph")
        idx, val = idx[:, pruned.edges], val[pruned.edges]
    path = Path(path)
    write_json(path, {
        "schema": SCHEMA, "version": SCHEMA_VERSION, "tokens": graph.tokens.tolist(), "target": graph.target,
        "info": {k: v for k, v in graph.info.items() if not k.startswith("_")},
        "nodes": [[n.kind, n.channel, n.index, n.position, n.stream, float(x), float(b), float(pre), n.sae]
                  for n, x, b, pre in zip(graph.nodes, graph.activation.tolist(), graph.bias.tolist(),
                                          graph.pre_activation.tolist(), strict=True)],
        "edges": {"target": idx[0].tolist(), "source": idx[1].tolist(), "weight": val.tolist()},
    })
    return path


def load_graph(path: str | os.PathLike) -> AttributionGraph:
    """Read a graph written by :func:`save_graph`; a damaged or foreign file raises ``ArtifactError``."""
    meta = read_versioned_json(path, None, SCHEMA, _WRITER, required=("tokens", "target", "nodes", "edges"))
    with reading(path, _WRITER):
        nodes = [Node(kind, channel, index, position, stream, sae)
                 for kind, channel, index, position, stream, _, _, _, sae in meta["nodes"]]
        bad = [n.kind for n in nodes if n.kind not in NODE_KINDS]
        if bad or not nodes or nodes[-1].kind != "logit":
            raise ValueError(f"node kinds must be {NODE_KINDS} with the logit last, got {bad or nodes[-1:]}")
        n = len(nodes)
        e = meta["edges"]
        index = torch.tensor([e["target"], e["source"]], dtype=torch.long).reshape(2, -1)
        if index.numel() and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"edge endpoints must lie in [0, {n})")
        adjacency = torch.sparse_coo_tensor(index, torch.tensor(e["weight"], dtype=torch.float64), (n, n),
                                            check_invariants=True).coalesce()
        return AttributionGraph(nodes=nodes, adjacency=adjacency,
                                activation=torch.tensor([x[5] for x in meta["nodes"]], dtype=torch.float64),
                                pre_activation=torch.tensor([x[7] for x in meta["nodes"]], dtype=torch.float64),
                                bias=torch.tensor([x[6] for x in meta["nodes"]], dtype=torch.float64),
                                tokens=torch.tensor(meta["tokens"], dtype=torch.long),
                                target={k: list(v) for k, v in meta["target"].items()}, info=dict(meta.get("info", {})))
