"""Attribution graphs as JSON, written atomically.

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

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tl_modular._io import SCHEMA_VERSION, read_versioned_json, reading, write_json
from tl_modular.attribution.graph import NODE_KINDS, AttributionGraph, Node

if TYPE_CHECKING:
    from tl_modular.attribution.pruning import Pruned

__all__ = ["load_graph", "save_graph"]

SCHEMA = "attribution_graph"
_WRITER = "AttributionGraph.save (tlm.attribution_graph)"


def save_graph(graph: AttributionGraph, path: str | os.PathLike, *, pruned: Pruned | None = None) -> Path:
    """Write ``graph`` (only ``pruned``'s kept edges when given) to the JSON file ``path``."""
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
