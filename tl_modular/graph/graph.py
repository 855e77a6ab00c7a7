"""The compressed computational graph: channels, their read ports, the routes between them, modules.

``tlm.build_graph(comp, model, tokens)`` turns a :class:`~tl_modular.Compression` into a
:class:`ChannelGraph`. ``graph.nx`` is a networkx ``DiGraph`` with

- a node per channel (``embed``, ``pos_embed``, ``L{l}.H{h}``, ``L{l}.MLP``; attributes ``kind``,
  ``layer``, ``head``, ``write_rank``, ``write_energy``, ``write_effective_rank``, ``order``);
- a port node per head input path (``L{l}.H{h}:q``, ``:k``, ``:v``; ``kind="port"``, ``channel``,
  ``read_rank``, ``read_energy``) with a ``kind="port"`` edge into its head; an MLP is its own port;
- an ``unembed`` sink;
- a ``kind="route"`` edge from every writer to every later reader port with ``static`` and
  ``share`` (weights and spectra) and, when tokens are given, ``attribution`` (signed first-order
  change of the mean loss when the route is mean-ablated through the subspaces) and ``data`` (the
  mean per-position magnitude of that attribution). Routes into ``unembed`` are direct logit
  attribution on the loss.
  See :mod:`tl_modular.graph.routes` for the definitions.

Modules come from min cuts: the routes collapse onto an undirected *capacity graph* on channels
and ``unembed`` (capacity of a pair = the summed strength of the routes between them), whose
Gomory–Hu tree holds every pairwise min cut; cutting its weakest edges whose smaller side keeps
at least ``min_size`` channels gives the module hierarchy.

>>> graph = tlm.build_graph(comp, model=model, tokens=tokens)     # doctest: +SKIP
>>> graph.modules()                                               # doctest: +SKIP
[frozenset({'embed', 'L0.H0', ...}), ...]
>>> graph.modularity(n_null=100)["Q"]                             # doctest: +SKIP
{'value': 0.31, 'null_mean': 0.12, 'z': 5.2, 'p': 0.0099}

Saved graphs (``graph.save(dir)`` → ``dir/graph.json``) follow this schema (version 1)::

    {"schema": "tl_modular.ChannelGraph", "version": 1, "model_fingerprint": str | null,
     "config": {"weight": "data" | "static", "n_tokens": int, ...},
     "compression_digest": str | null,           # Compression.digest() of the compression it was built from
     "nodes": [{"id": str, "kind": str, ...attributes}],
     "edges": [{"source": str, "target": str, "kind": "route" | "port", ...attributes}]}
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import networkx as nx
import numpy as np
import torch
from jaxtyping import Int

from tl_modular._io import SCHEMA_VERSION, ArtifactError, artifact_digest, read_versioned_json, reading, write_json
from tl_modular._models import check_finite, fingerprint
from tl_modular._names import channel_order, parse, split_port
from tl_modular._stats import spearman
from tl_modular._tokens import check_tokens
from tl_modular.graph import mincut as _mincut
from tl_modular.graph import routes as _routes
from tl_modular.graph import views
from tl_modular.graph.mincut import Backend, Split
from tl_modular.segmentation import ChannelSet, segment

if TYPE_CHECKING:      # annotations only: circuits builds on this module (see ChannelGraph.circuits)
    from tl_modular.circuits import CircuitSet
    from tl_modular.compression import Compression

__all__ = ["ChannelGraph", "ModuleRule", "Split", "build_graph", "spearman"]

Weight = Literal["data", "static"]
_SCHEMA = "tl_modular.ChannelGraph"


@dataclass(frozen=True)
class ModuleRule:
    """How modules are cut from a graph, as one value: the graph's modules, its hierarchy and the
    modules of every null graph in :meth:`ChannelGraph.modularity` follow the same rule.

    Attributes:
        weight: Route strength the capacities sum (``"data"`` or ``"static"``; ``None``: the graph's
            default, :attr:`ChannelGraph.weight`).
        io: Whether the embeddings and ``unembed`` take part (see :meth:`ChannelGraph.capacity_graph`).
        min_size: Channels each side of a cut keeps at least (``None``: 5% of them, at least 2).
        n_modules: How many modules (``None``: the level of the hierarchy with the highest Newman Q).
        max_cut: Cut every admissible tree edge up to this value instead.
        backend: Gomory–Hu solver: ``"auto"``, ``"networkx"`` or ``"igraph"``.

    The graph's methods take a rule or the same keywords (``graph.modules(ModuleRule(n_modules=3))``
    equals ``graph.modules(n_modules=3)``); a rule is hashable, so it can key a cache of modules.

    >>> rule = ModuleRule(n_modules=3, io=True)
    >>> rule == ModuleRule(io=True, n_modules=3), replace(rule, n_modules=4).n_modules
    (True, 4)
    """

    weight: Weight | None = None
    io: bool = False
    min_size: int | None = None
    n_modules: int | None = None
    max_cut: float | None = None
    backend: Backend = "auto"


_DEFAULT_RULE = ModuleRule()


def _effective_rank(spectrum: torch.Tensor) -> float:
    p = spectrum.double().clamp_min(0)
    if p.sum() <= 0:
        return 0.0
    p = p / p.sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


@dataclass
class ChannelGraph:
    """The compressed computational graph of a model (see the module docs)."""

    nx: nx.DiGraph
    model_fingerprint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    compression: Compression | None = field(default=None, repr=False)  # the one it was built from, if known
    # Compression.digest() of that compression (kept when the graph is saved without it): a load
    # beside another compression of the same model is refused instead of mixing the two
    compression_digest: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for _, k in self.nx.nodes(data="kind"):
            kinds[k] = kinds.get(k, 0) + 1
        return (f"ChannelGraph({len(self.channels)} channels, {len(self.routes())} routes, "
                f"weight={self.weight!r}, nodes={kinds})")

    # --- views -------------------------------------------------------------------------------

    @property
    def channels(self) -> list[str]:
        """Channel node names, in stream order."""
        nodes = [(d["order"], n) for n, d in self.nx.nodes(data=True) if d["kind"] not in ("port", "sink")]
        return [n for _, n in sorted(nodes)]

    @property
    def weight(self) -> Weight:
        """The default route strength for capacities: ``"data"`` when the graph has data strengths."""
        return self.config.get("weight", "static")

    def routes(self, weight: Weight | None = None) -> dict[tuple[str, str], float]:
        """``{(writer, port): strength}`` for every route (ports as in :mod:`tl_modular.patching`)."""
        key = weight or self.weight
        if key not in ("data", "static"):
            raise ValueError(f"weight must be 'data' or 'static', got {key!r}")
        if key == "data" and self.config.get("weight") != "data":
            raise ValueError("this graph has no data strengths: build it with model= and tokens=")
        return {(u, v): d[key] for u, v, d in self.nx.edges(data=True) if d["kind"] == "route"}

    def owner(self, port: str) -> str:
        """The channel (or ``unembed``) a port belongs to."""
        return self.nx.nodes[port].get("channel", port)

    def capacity_graph(self, weight: Weight | None = None, *, io: bool = False) -> nx.Graph:
        """Undirected graph whose capacity between two channels is the summed strength of the routes
        between them (ports collapsed onto their channel).

        The nodes are the heads and MLPs; with ``io=True`` also the embeddings and ``unembed``. They
        are left out by default because every channel talks to them: with them in, the Gomory–Hu
        tree becomes a star around them and every cheapest cut isolates a single channel.
        """
        return self._capacity_from(self.routes(weight), io=io)

    def partition_nodes(self, io: bool = False) -> list[str]:
        """The nodes modules are cut from: heads and MLPs, in stream order; with ``io`` also the
        embeddings (first) and ``unembed`` (last).

        >>> graph.partition_nodes()[:2]                  # doctest: +SKIP
        ['L0.H0', 'L0.H1']
        """
        inner = [n for n in self.channels if self.nx.nodes[n]["kind"] in ("head", "mlp")]
        if not io:
            return inner
        return [n for n in self.channels if n not in inner] + inner + (["unembed"] if "unembed" in self.nx else [])

    def _capacity_from(self, routes: dict[tuple[str, str], float], *, io: bool) -> nx.Graph:
        g = nx.Graph()
        g.add_nodes_from(self.partition_nodes(io))
        for (w, port), s in routes.items():
            u, v = w, self.owner(port)
            if u in g and v in g:
                prev = g.get_edge_data(u, v, {"capacity": 0.0})["capacity"]
                g.add_edge(u, v, capacity=prev + float(s))
        return g

    # --- modules -----------------------------------------------------------------------------

    def gomory_hu(self, weight: Weight | None = None, *, io: bool = False, backend: Backend = "auto") -> nx.Graph:
        """The Gomory–Hu tree of the capacity graph (edge ``weight`` = pairwise min cut)."""
        return _mincut.gomory_hu_tree(self.capacity_graph(weight, io=io), backend)

    def module_rule(self, rule: ModuleRule | None = None, **keywords: Any) -> ModuleRule:
        """The :class:`ModuleRule` the module methods use: ``rule``, or one built from the keywords
        (``weight``, ``io``, ``min_size``, ``n_modules``, ``max_cut``, ``backend``), with ``weight``
        resolved to the graph's default.

        Raises:
            ValueError: both a rule and keywords that differ from their defaults.

        >>> graph.module_rule(n_modules=3) == graph.module_rule(ModuleRule(n_modules=3))       # doctest: +SKIP
        True
        """
        if rule is None:
            rule = ModuleRule(**keywords)
        elif not isinstance(rule, ModuleRule):
            raise TypeError(f"rule must be a ModuleRule, got {type(rule).__name__}")
        else:
            extra = sorted(k for k, v in keywords.items() if v != getattr(_DEFAULT_RULE, k))
            if extra:
                raise ValueError(f"pass the module rule either as rule= or as keywords, not both: got rule= and "
                                 f"{', '.join(f'{k}=' for k in extra)}; use dataclasses.replace(rule, ...) to vary it")
        return rule if rule.weight is not None else replace(rule, weight=self.weight)

    def _min_size(self, rule: ModuleRule) -> int:
        n = len(self._counted(rule.io))
        if rule.min_size is not None and not 1 <= rule.min_size <= n:
            raise ValueError(f"min_size must lie in 1..{n} (the channels of this graph), got {rule.min_size}")
        return max(2, round(0.05 * n)) if rule.min_size is None else int(rule.min_size)

    def _counted(self, io: bool) -> list[str]:
        return [n for n in self.partition_nodes(io) if n != "unembed"]

    def _partition(self, capacity: nx.Graph, rule: ModuleRule, *,
                   clamp: bool = False) -> tuple[list[frozenset], list[Split]]:
        parts, splits, _ = _mincut.find_modules(capacity, min_size=self._min_size(rule), counted=self._counted(rule.io),
                                                n_modules=rule.n_modules, max_cut=rule.max_cut,
                                                backend=rule.backend, clamp=clamp)
        return parts, splits

    def modules(self, rule: ModuleRule | None = None, *, weight: Weight | None = None, io: bool = False,
                min_size: int | None = None, n_modules: int | None = None, max_cut: float | None = None,
                backend: Backend = "auto") -> list[frozenset[str]]:
        """Modules: channel sets cut from the Gomory–Hu tree of :meth:`capacity_graph`, by ``rule``
        (a :class:`ModuleRule`) or the same keywords.

        Tree edges are cut from the weakest up while both sides keep ``min_size`` channels
        (default 5% of them, at least 2); ``n_modules`` fixes how many (more than the tree admits is
        an error naming the maximum), ``max_cut`` cuts every
        admissible edge up to that value, and by default the level of the hierarchy with the
        highest Newman Q is taken. Modules list channel names only (no ports, no ``unembed``),
        largest first; the embeddings join a module only with ``io=True``.
        """
        rule = self.module_rule(rule, weight=weight, io=io, min_size=min_size, n_modules=n_modules, max_cut=max_cut,
                         backend=backend)
        parts, _ = self._partition(self.capacity_graph(rule.weight, io=rule.io), rule)
        return _strip(parts)

    def hierarchy(self, rule: ModuleRule | None = None, *, weight: Weight | None = None, io: bool = False,
                  min_size: int | None = None, backend: Backend = "auto") -> list[Split]:
        """Every admissible cut, in the order the tree's weakest edges separate the modules
        (``Split.parent`` → ``left`` + ``right`` at min-cut ``value``; channel names only).
        ``rule.n_modules`` and ``rule.max_cut`` do not apply: the hierarchy holds every level."""
        rule = self.module_rule(rule, weight=weight, io=io, min_size=min_size, backend=backend)
        tree = self.gomory_hu(rule.weight, io=rule.io, backend=rule.backend)
        splits = _mincut.hierarchy(tree, min_size=self._min_size(rule), counted=self._counted(rule.io))
        clean = lambda s: frozenset(s - {"unembed"})  # noqa: E731
        return [Split(s.value, clean(s.parent), clean(s.left), clean(s.right)) for s in splits]

    def components(self, threshold: float, *, weight: Weight | None = None, io: bool = False,
                   backend: Backend = "auto") -> list[frozenset[str]]:
        """Communication components: channel classes whose every pairwise min cut exceeds ``threshold``."""
        return _strip(_mincut.components(self.gomory_hu(weight, io=io, backend=backend), threshold))

    def modularity(self, rule: ModuleRule | None = None, *, weight: Weight | None = None,
                   null: Literal["permute", "rotate"] = "permute", n_null: int = 100, seed: int = 0, io: bool = False,
                   min_size: int | None = None, n_modules: int | None = None, max_cut: float | None = None,
                   backend: Backend = "auto", modules: Sequence[Iterable[str]] | None = None,
                   progress: bool = True) -> dict[str, Any]:
        """How modular the graph is, against a null model built on the graph itself.

        Scores the modules of :meth:`modules` (same ``rule`` or keywords) by ``crossing`` (fraction of
        capacity between modules; lower is more modular), ``ncut`` (lower is more modular) and
        Newman's ``Q`` (higher is more modular). Each null graph finds its own modules by the same
        rule, so the comparison is fair. With ``modules=`` (channel sets, e.g. the modules a
        training loss was given), that partition is scored instead, on the graph and on every null
        graph alike: is the graph more modular *along these modules* than its null?

        Nulls: ``"permute"`` shuffles route strengths among the
        routes of the same writer layer → reader layer and port kind; ``"rotate"`` (static
        strengths only) turns each channel's read and write subspaces by independent Haar-random
        rotations, keeping ranks and spectra, and recomputes the static strengths.

        Returns ``{metric: {"value", "null_mean", "null_std", "z", "p"}}`` with one-sided empirical
        p-values ``(1 + #null at least as modular) / (1 + n_null)``, plus ``"modules"`` (count).
        """
        from tqdm.auto import tqdm

        if n_null < 2:
            raise ValueError(f"n_null must be >= 2 null graphs (a z-score needs their spread), got {n_null}")
        rule = self.module_rule(rule, weight=weight, io=io, min_size=min_size, n_modules=n_modules, max_cut=max_cut,
                         backend=backend)
        capacity = self.capacity_graph(rule.weight, io=rule.io)
        if modules is not None:
            fixed = self._fixed_partition(capacity, modules)
        parts = fixed if modules is not None else self._partition(capacity, rule)[0]
        real = _mincut.partition_scores(capacity, parts)
        rng = np.random.default_rng(seed)
        sampler = self._null_sampler(rule.weight, null, rng, rule.io)
        nulls = []
        for _ in tqdm(range(n_null), desc=f"null model ({null})", disable=not progress):
            cap = sampler()
            p = fixed if modules is not None else self._partition(cap, rule, clamp=True)[0]
            nulls.append(_mincut.partition_scores(cap, p))
        out: dict[str, Any] = {"modules": len(parts), "null": null, "n_null": n_null}
        for key, higher in (("crossing", False), ("ncut", False), ("Q", True)):
            vals = np.array([n[key] for n in nulls])
            mean, std = float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            as_good = (vals >= real[key] - 1e-12) if higher else (vals <= real[key] + 1e-12)
            z = (real[key] - mean) / std if std > 0 else float("nan")
            out[key] = {"value": real[key], "null_mean": mean, "null_std": std, "z": z,
                        "p": float((1 + as_good.sum()) / (1 + len(vals)))}
        return out

    def _fixed_partition(self, capacity: nx.Graph, modules: Sequence[Iterable[str]]) -> list[frozenset]:
        """``modules`` as a partition of ``capacity``'s nodes (nodes in none of them stand alone)."""
        parts = [frozenset(m) & set(capacity.nodes) for m in modules]
        seen: set[str] = set()
        for p in parts:
            if p & seen:
                raise ValueError("modules overlap: each channel may belong to one module only")
            seen |= p
        unknown = set().union(*map(set, modules)) - set(capacity.nodes) if modules else set()
        if unknown & set(self.channels):
            raise ValueError(f"channels {sorted(unknown)[:5]} are not nodes of this capacity graph (io=True?)")
        if unknown - set(self.channels):
            raise ValueError(f"unknown channels in modules: {sorted(unknown - set(self.channels))[:5]}")
        return [p for p in parts if p] + [frozenset([n]) for n in capacity.nodes if n not in seen]

    def _null_sampler(self, weight: Weight, null: str, rng: np.random.Generator, io: bool):
        nodes = set(self.partition_nodes(io))
        routes = {k: v for k, v in self.routes(weight).items() if k[0] in nodes and self.owner(k[1]) in nodes}
        keys = list(routes)
        if null == "permute":
            groups: dict[tuple, list[int]] = {}
            for i, (w, port) in enumerate(keys):
                owner = self.owner(port)
                path = split_port(port)[1] or self.nx.nodes[owner]["kind"]
                groups.setdefault((self.nx.nodes[w]["layer"], self.nx.nodes[owner]["layer"], path), []).append(i)
            values = np.array([routes[k] for k in keys])

            def sample() -> nx.Graph:
                perm = values.copy()
                for idx in groups.values():
                    perm[idx] = values[rng.permutation(idx)]
                return self._capacity_from({k: float(v) for k, v in zip(keys, perm, strict=True)}, io=io)
            return sample
        if null == "rotate":
            if weight != "static":
                raise ValueError("the rotation null recomputes static strengths: pass weight='static' "
                                 "(or null='permute' for data strengths)")
            if self.compression is None:
                raise ValueError("the rotation null needs the compression: build the graph in this session "
                                 "or load it with ChannelGraph.load(dir, compression=comp)")
            return self._rotation_sampler(rng, io)
        raise ValueError(f"null must be 'permute' or 'rotate', got {null!r}")

    def _rotation_sampler(self, rng: np.random.Generator, io: bool):
        ws = _routes.writers(self.compression, None)
        rs = _routes.readers(self.compression, None)
        # embeddings and the unembedding keep their measured static strengths: they are not
        # channels of the compression and have no subspace to rotate
        fixed = {k: v for k, v in self.routes("static").items() if k[0] in ("embed", "pos_embed")
                 or k[1] == "unembed"}
        valid = _routes.valid_matrix(None, ws, rs)
        d = ws[0].root.shape[0]
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))

        def haar() -> torch.Tensor:
            q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
            return q * r.diagonal().sign()

        def sample() -> nx.Graph:
            # a rotated side keeps its worth per direction; only its orientation is random
            rw = [_routes.Writer(w.name, None, w.spectrum, w.mean, haar() @ w.root) for w in ws]
            rr = [_routes.Reader(r.port, r.channel, None, None, r.spectrum, haar() @ r.encoder) for r in rs]
            static, _ = _routes.static_strengths(rr, rw, valid)
            routes = dict(fixed)
            for i, j in _routes.iter_routes(rw, rr, valid):
                routes[(ws[i].name, rs[j].port)] = float(static[i, j])
            return self._capacity_from(routes, io=io)
        return sample

    # --- checks against the model ---------------------------------------------------------------

    def check_routes(self, model: Any, tokens: Int[torch.Tensor, "batch pos"], *, n: int = 50, seed: int = 0,
                     attention_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                     batch_size: int = 16, routes: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
        """Compare data strengths with real ablation: mean-ablate each of ``n`` sampled routes (all
        of them when the graph has fewer; or the given ``routes``) through the subspaces and measure
        the change of the mean CE loss.

        Returns ``{"routes", "predicted", "strength", "actual", "spearman", "spearman_signed"}``:
        ``spearman`` ranks the routes' ``data`` strengths against ``|actual|``, ``spearman_signed``
        their signed ``attribution`` against ``actual``.
        """
        self.check_data(model)
        if routes is None and n < 1:
            raise ValueError(f"n must be >= 1 routes to sample, got {n}")
        channels = segment(model)
        ws = {w.name: w for w in _routes.writers(self.compression, channels, tokens, attention_mask)}
        rs = {r.port: r for r in _routes.readers(self.compression, model)}
        all_routes = sorted(self.routes("data"))
        if routes is None:
            rng = np.random.default_rng(seed)
            idx = rng.choice(len(all_routes), size=min(n, len(all_routes)), replace=False)
            routes = [all_routes[i] for i in sorted(idx)]
        predicted = [float(self.nx.edges[r]["attribution"]) for r in routes]
        strength = [float(self.nx.edges[r]["data"]) for r in routes]
        actual = _routes.ablation_effects(model, channels, [([(w, p)], rs[p]) for w, p in routes], ws, tokens,
                                          attention_mask, loss_mask, metric=self.config.get("metric", "loss"),
                                          batch_size=batch_size)
        return {"routes": list(routes), "predicted": predicted, "strength": strength, "actual": actual,
                "spearman": spearman(strength, [abs(x) for x in actual]),
                "spearman_signed": spearman(predicted, actual)}

    def lesion(self, model: Any, tokens: Int[torch.Tensor, "batch pos"], *, modules: Sequence[frozenset] | None = None,
               n_random: int = 5, seed: int = 0, attention_mask: torch.Tensor | None = None,
               loss_mask: torch.Tensor | None = None, batch_size: int = 16,
               weight: Weight | None = None) -> dict[str, Any]:
        """Lesion test: mean-ablate every route between modules, and random sets of routes between
        module members of the same total strength, and compare the change of the mean loss.

        A modular graph loses less from its cross-module routes than from random ones
        (``ratio = cross / random_mean < 1``).
        """
        self.check_data(model)
        weight = weight or self.weight
        modules = list(modules) if modules is not None else self.modules(weight=weight)
        label = {n: i for i, m in enumerate(modules) for n in m}
        # routes between module members only: those from the embeddings and into the unembedding
        # belong to no module and are never lesioned
        strengths = {r: s for r, s in self.routes(weight).items() if r[0] in label and self.owner(r[1]) in label}
        cross = [r for r in strengths if label[r[0]] != label[self.owner(r[1])]]
        target = sum(strengths[r] for r in cross)
        channels = segment(model)
        ws = {w.name: w for w in _routes.writers(self.compression, channels, tokens, attention_mask)}

        rng = np.random.default_rng(seed)
        keys = sorted(strengths)
        sets = [cross]
        for _ in range(n_random):
            order = rng.permutation(len(keys))
            cum = np.cumsum([strengths[keys[i]] for i in order])
            k = int(np.argmin(np.abs(cum - target))) + 1 if len(cum) and target > 0 else 0
            sets.append([keys[i] for i in order[:k]])
        changes = _routes.ablation_effects(model, channels, [(s, None) for s in sets], ws, tokens, attention_mask,
                                           loss_mask, metric=self.config.get("metric", "loss"),
                                           batch_size=batch_size)
        cross_change, randoms = changes[0], changes[1:]
        rand = float(np.mean(randoms)) if randoms else float("nan")
        return {"n_cross_routes": len(cross), "cross_strength": float(target), "cross": cross_change,
                "random": randoms, "random_mean": rand,
                "ratio": cross_change / rand if rand not in (0.0,) and not math.isnan(rand) else float("nan")}

    def circuits(self, model: Any, categories: Mapping[str, Any], **kwargs: Any) -> CircuitSet:
        """Per-category circuits: ``{name: Task or [batch, pos] tokens}`` → :class:`~tl_modular.circuits.CircuitSet`
        (attribution scores per example, greedy growth verified by route patching, bootstrap
        intervals; see :func:`tl_modular.circuits.find_circuits` for the options)."""
        # the one call up the data flow: a convenience for tlm.circuits.find_circuits(graph, ...), which
        # builds on the graph (so it is imported here, not at module level)
        from tl_modular.circuits import find_circuits
        return find_circuits(self, model, categories, **kwargs)

    def check_data(self, model: Any) -> None:
        """Raise ``ValueError`` unless the graph holds its compression and belongs to ``model``: what
        every method that runs the model needs (route checks, lesions, circuits).

        >>> graph.check_data(model)                      # doctest: +SKIP
        """
        if self.compression is None:
            raise ValueError("this needs the compression the graph was built from: build it in this session "
                             "or load it with ChannelGraph.load(dir, compression=comp)")
        if self.model_fingerprint is not None and self.model_fingerprint != fingerprint(model):
            raise ValueError("this graph belongs to another model (its weights or config differ)")

    # --- files -------------------------------------------------------------------------------

    def _to_json(self) -> dict[str, Any]:
        nodes = [{"id": n, **d} for n, d in self.nx.nodes(data=True)]
        edges = [{"source": u, "target": v, **d} for u, v, d in self.nx.edges(data=True)]
        return {"model_fingerprint": self.model_fingerprint, "config": self.config,
                "compression_digest": self.compression_digest, "nodes": nodes, "edges": edges}

    def digest(self) -> str:
        """SHA-256 of what :meth:`save` writes (the same after a load): circuits record it, so that
        circuits loaded beside another graph are refused.

        >>> graph.digest() == tlm.ChannelGraph.load(graph.save("g")).digest()   # doctest: +SKIP
        True
        """
        return artifact_digest(self._to_json())

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/graph.json`` (atomic; schema in the module docs). It records the digest
        of the compression the graph was built from, checked by :meth:`load`."""
        directory = Path(directory)
        write_json(directory / "graph.json", {"schema": _SCHEMA, "version": SCHEMA_VERSION, **self._to_json()})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, compression: Compression | None = None) -> ChannelGraph:
        """Read a graph written by :meth:`save` (pass ``compression=`` for the checks that need it).

        Raises :class:`~tl_modular.errors.ArtifactError` when ``compression`` is not the one the graph
        was built from (e.g. a report re-run interrupted after the compression was saved anew and
        before the graph was)."""
        path, writer = Path(directory) / "graph.json", "ChannelGraph.save"
        meta = read_versioned_json(directory, "graph.json", _SCHEMA, writer,
                                   required=("nodes", "edges", "model_fingerprint", "config"))
        g = nx.DiGraph()
        with reading(path, writer):
            for node in meta["nodes"]:
                attrs = dict(node)
                g.add_node(attrs.pop("id"), **attrs)
            for edge in meta["edges"]:
                attrs = dict(edge)
                g.add_edge(attrs.pop("source"), attrs.pop("target"), **attrs)
        if compression is not None and meta["model_fingerprint"] not in (None, compression.model_fingerprint):
            raise ValueError("the compression belongs to another model than the graph")
        digest = meta.get("compression_digest")
        if compression is not None and digest is not None and digest != compression.digest():
            raise ArtifactError(f"{path} was built from another compression than the one given (same model, other "
                                "contents): they come from different saves (a save was interrupted between the "
                                "compression and the graph, or the compression was computed again); build the graph "
                                "again with tlm.build_graph", path=path)
        return cls(g, meta["model_fingerprint"], meta["config"], compression, digest)

    def to_graphml(self, path: str | os.PathLike) -> Path:
        """Export to GraphML (networkx), e.g. for Gephi or Cytoscape."""
        return views.write_graphml(self, Path(path))

    def to_dot(self, path: str | os.PathLike, *, weight: Weight | None = None, modules=None) -> Path:
        """Export the channel-level graph to Graphviz DOT, modules as clusters."""
        return views.write_dot(self, Path(path), weight=weight or self.weight, modules=modules)

    def plot(self, path: str | os.PathLike | None = None, *, weight: Weight | None = None,
             modules: Sequence[frozenset] | None = None, top: float = 0.9, ax: Any = None) -> Any:
        """Draw channels by stream position, modules coloured, edge widths by strength (the routes
        carrying the ``top`` fraction of all strength). Saves to ``path`` when given; returns the axes."""
        return views.plot(self, None if path is None else Path(path), weight=weight or self.weight,
                    modules=modules, top=top, ax=ax)


def _strip(parts: Sequence[frozenset]) -> list[frozenset[str]]:
    out = [frozenset(p - {"unembed"}) for p in parts]
    return sorted((p for p in out if p), key=lambda p: (-len(p), sorted(p)))


# --- building ------------------------------------------------------------------------------------

def build_graph(comp: Compression, model: Any | None = None, tokens: Int[torch.Tensor, "batch pos"] | None = None, *,
                attention_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                metric: Literal["loss", "logit"] = "loss", batch_size: int = 16,
                progress: bool = True) -> ChannelGraph:
    """The compressed computational graph of ``comp``.

    Args:
        comp: A :class:`~tl_modular.Compression`.
        model: The model it belongs to; adds the embeddings as writers and ``unembed`` as a sink.
        tokens: ``[batch, pos]`` data for the data strengths (needs ``model``): one forward and one
            backward pass per batch.
        attention_mask: ``[batch, pos]``, 1 for real tokens.
        loss_mask: ``[batch, pos]``, 1 where the next-token prediction counts in the loss (all real
            tokens by default; the bundled model's task positions: ``toy.mixed_tokens(scored=True)``).
        metric: What the data strengths measure: next-token CE (``"loss"``) or the correct token's
            logit against the mean logit (``"logit"``; for models so confident on their data that
            CE gradients vanish, such as the bundled one on its tasks).

    Returns:
        A :class:`ChannelGraph`; its capacities use data strengths when tokens were given.

    >>> graph = tlm.build_graph(comp, model=model, tokens=tokens)   # doctest: +SKIP
    """
    channels: ChannelSet | None = None
    if model is not None:
        check_finite(model, "build_graph")  # before the fingerprint check: it names the broken parameter
        comp.check_model(model)
        channels = segment(model)
    if tokens is not None and model is None:
        raise ValueError("data strengths need the model: pass model= with tokens=")
    if len(comp) == 0:
        raise ValueError("the compression holds no channels")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (sequences per pass), got {batch_size!r}")
    if tokens is not None:
        tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    ws = _routes.writers(comp, channels, tokens, attention_mask)
    rs = _routes.readers(comp, model)
    valid = _routes.valid_matrix(channels, ws, rs)
    static, share = _routes.static_strengths(rs, ws, valid)
    attribution = magnitude = None
    if tokens is not None:
        attribution, magnitude = _routes.attributions(model, channels, ws, rs, valid, tokens, attention_mask, loss_mask,
                                           metric=metric, batch_size=batch_size, progress=progress)

    g = nx.DiGraph()
    for w in ws:
        g.add_node(w.name, **_node_attrs(w.name, comp, channels))
    for r in rs:
        if r.port == "unembed":
            g.add_node("unembed", kind="sink", layer=_layers(comp, channels), order=math.inf)
        elif r.port != r.channel:
            g.add_node(r.port, kind="port", channel=r.channel, path=split_port(r.port)[1],
                       layer=g.nodes[r.channel]["layer"], order=g.nodes[r.channel]["order"] - 0.25,
                       read_rank=int(len(r.spectrum)), read_energy=float(r.spectrum.sum()))
            g.add_edge(r.port, r.channel, kind="port")
        else:
            g.nodes[r.channel].update(read_rank=int(len(r.spectrum)), read_energy=float(r.spectrum.sum()))
    for i, j in _routes.iter_routes(ws, rs, valid):
        attrs = {"kind": "route", "static": float(static[i, j]), "share": float(share[i, j])}
        if attribution is not None:
            attrs.update(attribution=float(attribution[i, j]), data=float(magnitude[i, j]))
        g.add_edge(ws[i].name, rs[j].port, **attrs)
    config = {"weight": "data" if attribution is not None else "static", "has_model": model is not None,
              "metric": metric,
              "n_tokens": 0 if tokens is None else _routes.n_targets(tokens, attention_mask, loss_mask),
              "compression": dict(comp.config), "total_rank": comp.total_rank}
    return ChannelGraph(g, comp.model_fingerprint, config, comp, comp.digest())


def _layers(comp: Compression, channels: ChannelSet | None) -> int:
    if channels is not None:
        return channels.model.cfg.n_layers
    return 1 + max(parse(n).layer for n in comp)


def _node_attrs(name: str, comp: Compression, channels: ChannelSet | None) -> dict[str, Any]:
    if name in ("embed", "pos_embed"):
        return {"kind": name, "layer": -1, "order": -1.0}
    cc = comp[name]
    parsed = parse(name)
    attrs: dict[str, Any] = {"kind": cc.kind, "layer": parsed.layer, "order": channel_order(name, reading=True)}
    if cc.kind == "head":
        attrs["head"] = parsed.head
    spec = cc.write.spectrum[: cc.write.rank]
    attrs.update(write_rank=int(cc.write.rank), write_energy=float(spec.sum()),
                 write_effective_rank=_effective_rank(spec))
    return attrs
