"""Model diffing: what changed between two models of one architecture, channel by channel.

``tlm.diff(a, b)`` compares two :class:`~tl_modular.Compression`\\ s or two
:class:`~tl_modular.ChannelGraph`\\ s (in memory, loaded, or a saved directory holding
``graph.json`` / ``compression.json`` / ``circuits.json``), like a code review of a model:

- per channel and side (``read:q`` ... ``read:in``, ``write``): the principal angles between the
  two subspaces (orthonormal residual-stream bases, :attr:`Side.basis`), the rank change and the
  change of the normalized spectrum;
- per route: the change of its strength (``static`` and, when both graphs have it, ``data``),
  each graph's strengths divided by their total so that a global rescaling is no change;
- module reassignments (channels whose module moved, after matching modules by overlap) and the
  adjusted Rand index of the two partitions;
- per circuit category: routes gained and lost;
- label changes (unit → text) when labels are given.

Everything is ranked so the biggest changes come first. Raw changes favour what is big and
fragile: after any fine-tune the strong routes every input uses move most. With ``null=`` —
graphs of copies of model ``a`` moved in random directions by as much as ``b`` moved, tensor by
tensor (:func:`diff_null`) — each change also gets a z-score against those untargeted changes of
equal size, and the ranking is by it: what changed *more than chance*.

>>> null = [build(m) for m in tlm.diff_null(model, tuned, n=4)]   # doctest: +SKIP
>>> tlm.diff(build(model), build(tuned), null=null).top_routes(5)  # doctest: +SKIP

>>> d = tlm.diff(graph_before, graph_after)          # doctest: +SKIP
>>> print(d.summary())                                # doctest: +SKIP
>>> d.top_routes(5), d.top_channels(5)                # doctest: +SKIP
>>> d.plot(graph_after, "diff.png")                   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tl_modular._io import SCHEMA_VERSION, read_versioned_json, reading, write_json
from tl_modular._stats import adjusted_rand_index, principal_angles
from tl_modular.circuits import CircuitSet
from tl_modular.compression.compression import Compression, Side
from tl_modular.graph.graph import ChannelGraph
from tl_modular.graph.views import Layout, pyplot, save_figure

__all__ = ["ChannelChange", "ModelDiff", "RouteChange", "diff", "diff_null", "principal_angles"]

_SCHEMA = "tl_modular.ModelDiff"

#: What :func:`diff` compares: a compression, a graph, or a directory saved by them.
Diffable = Compression | ChannelGraph | str | os.PathLike

# Principal angles below this many degrees are fp noise of float32 storage (saved compressions)
# and QR; route changes below this fraction of the total strength likewise.
ANGLE_TOL_DEG = 1e-2
ROUTE_TOL = 1e-6
# z-scores divide by the null's RMS change, floored at this fraction of its median over routes
# (channel sides): a route that chance never moves would otherwise turn fp noise into a huge z.
NULL_FLOOR = 0.1


@dataclass
class ChannelChange:
    """How one side of one channel changed (angles in degrees; ``None`` where no compression)."""

    channel: str
    side: str                               # "read:q" | "read:k" | "read:v" | "read:in" | "write"
    max_angle: float | None                 # the largest principal angle
    mean_sin2: float | None                 # mean sin² of the principal angles (0 same, 1 orthogonal)
    angles: list[float] | None
    rank_a: int
    rank_b: int
    spectrum_change: float                  # ‖s_a/Σs_a - s_b/Σs_b‖₁ / 2 over the kept spectra (0..1)
    energy_ratio: float                     # Σs_b / Σs_a (the side's total worth, before → after)
    energy_moved: float | None = None       # spectrum-weighted share of each side outside the other (0..1)
    z: float | None = None                  # score over the null's RMS score (diff(null=...)), else None

    @property
    def score(self) -> float:
        """Ranking key: the energy moved out of the other subspace (weak directions of a nearly flat
        spectrum turn freely and would dominate the largest angle), else the spectrum change."""
        if self.energy_moved is not None:
            return self.energy_moved
        return max(self.spectrum_change, 1.0 if self.rank_a != self.rank_b else 0.0)


@dataclass
class RouteChange:
    """How one route's strength changed.

    ``share_a`` is the route's strength over the total strength of graph ``a``; ``share_b`` is its
    strength in ``b`` brought to ``a``'s scale (divided by the median ratio b/a over all routes)
    over the same total. So a global rescaling of ``b`` is no change, and shares compare directly.
    """

    writer: str
    port: str
    weight: str                             # "data" | "static"
    a: float
    b: float
    share_a: float
    share_b: float
    z: float | None = None                  # delta over the null's RMS delta (diff(null=...)), else None

    @property
    def delta(self) -> float:
        """Change of the route's share of ``a``'s total strength, ``b`` at ``a``'s scale."""
        return self.share_b - self.share_a

    @property
    def relative(self) -> float:
        """``(share_b - share_a) / max(share_a, share_b)`` in [-1, 1]: 1 = new route, -1 = gone."""
        top = max(abs(self.share_a), abs(self.share_b))
        return 0.0 if top == 0 else self.delta / top

    @property
    def route(self) -> tuple[str, str]:
        return (self.writer, self.port)


@dataclass
class ModelDiff:
    """What changed from model ``a`` to model ``b`` (see :func:`diff`); lists are biggest first."""

    channels: list[ChannelChange] = field(default_factory=list)
    routes: list[RouteChange] = field(default_factory=list)            # primary weight, ranked
    routes_other: list[RouteChange] = field(default_factory=list)      # the other weight, ranked
    modules: dict[str, Any] | None = None
    circuits: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # --- views ---------------------------------------------------------------------------------

    def top_channels(self, n: int = 10, *, by_channel: bool = True) -> list[ChannelChange]:
        """The ``n`` most changed sides; ``by_channel`` keeps each channel's biggest side only."""
        _check_n(n)
        out, seen = [], set()
        if n == 0:
            return out
        for c in self.channels:
            if by_channel and c.channel in seen:
                continue
            seen.add(c.channel)
            out.append(c)
            if len(out) >= n:
                break
        return out

    def top_routes(self, n: int = 10) -> list[RouteChange]:
        """The ``n`` routes whose share of the total strength changed most (primary weight), or
        with a null, whose change is largest against chance (``|z|``)."""
        _check_n(n)
        return self.routes[:n]

    def changed_channels(self, tol_deg: float = 1.0) -> list[str]:
        """Channels with a side turned by more than ``tol_deg`` degrees or whose rank changed."""
        out: list[str] = []
        for c in self.channels:
            turned = (c.max_angle is not None and c.max_angle > tol_deg) or c.rank_a != c.rank_b
            if turned and c.channel not in out:
                out.append(c.channel)
        return out

    def moved_channels(self) -> list[str]:
        return [] if self.modules is None else list(self.modules["moved"])

    @property
    def is_empty(self) -> bool:
        """No side turned beyond fp noise, no rank or route change, no reassignment, no circuit or label change."""
        angles = all(c.max_angle is None or c.max_angle <= ANGLE_TOL_DEG for c in self.channels)
        ranks = all(c.rank_a == c.rank_b and c.spectrum_change <= 1e-5 for c in self.channels)
        routes = all(abs(r.delta) <= ROUTE_TOL for r in self.routes + self.routes_other)
        circuits = all(not v["gained"] and not v["lost"] for v in self.circuits.values())
        return angles and ranks and routes and not self.moved_channels() and circuits and not self.labels

    def summary(self, n: int = 10) -> str:
        """A text report, biggest changes first."""
        _check_n(n)
        m = self.meta
        lines = [f"ModelDiff {m.get('label_a', 'a')} → {m.get('label_b', 'b')}: {m.get('n_channels', 0)} channels, "
                 f"{m.get('n_routes', 0)} routes" + (" — no change" if self.is_empty else "")]
        if self.channels and self.channels[0].max_angle is not None:
            against = f", ranked by z over {m['n_null']} null models" if m.get("n_null") else ""
            lines.append(f"Channels turned most (spectrum-weighted energy outside the other subspace{against}; "
                         f"{len(self.changed_channels())} with an angle beyond 1°):")
            for c in self.top_channels(n):
                rank = f"rank {c.rank_a}→{c.rank_b}" if c.rank_a != c.rank_b else f"rank {c.rank_a}"
                z = "" if c.z is None else f"  z {c.z:.1f}"
                lines.append(f"  {c.channel:>10} {c.side:<7} energy moved {c.energy_moved:.3f}{z}  "
                             f"largest angle {c.max_angle:5.1f}°  mean sin² {c.mean_sin2:.3f}  "
                             f"{rank}  spectrum Δ {c.spectrum_change:.3f}  energy ×{c.energy_ratio:.2f}")
        elif self.channels:
            lines.append("Channels (no compression: ranks and spectra only):")
            for c in self.top_channels(n):
                lines.append(f"  {c.channel:>10} {c.side:<7} rank {c.rank_a}→{c.rank_b}  "
                             f"spectrum Δ {c.spectrum_change:.3f}")
        if self.routes:
            how = f"{self.routes[0].weight} strength, share of total"
            if m.get("n_null"):
                how = f"against chance: {how}; ranked by |z| over {m['n_null']} null models"
            lines.append(f"Routes changed most ({how}):")
            for r in self.top_routes(n):
                z = "" if r.z is None else f"  z {r.z:+.1f}"
                lines.append(f"  {r.writer:>10} → {r.port:<12} {r.share_a:.4f} → {r.share_b:.4f}  "
                             f"({r.relative:+.0%}){z}")
        if self.modules is not None:
            mo = self.modules
            lines.append(f"Modules: {mo['n_a']} → {mo['n_b']}, adjusted Rand index {mo['ari']:.3f}; "
                         f"moved: {', '.join(mo['moved']) or 'none'}")
        for cat, v in self.circuits.items():
            lines.append(f"Circuit {cat}: {v['size_a']} → {v['size_b']} routes, Jaccard {v['jaccard']:.2f}; "
                         f"+{len(v['gained'])} gained, -{len(v['lost'])} lost")
        if self.labels:
            lines.append(f"Labels changed: {len(self.labels)}")
            for lab in self.labels[:n]:
                lines.append(f"  {lab['unit']}: {lab['a']!r} → {lab['b']!r}")
        return "\n".join(lines)

    # --- files ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"schema": _SCHEMA, "version": SCHEMA_VERSION, "meta": self.meta,
                "channels": [asdict(c) for c in self.channels], "routes": [asdict(r) for r in self.routes],
                "routes_other": [asdict(r) for r in self.routes_other], "modules": self.modules,
                "circuits": self.circuits, "labels": self.labels}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelDiff:
        if d.get("schema") != _SCHEMA or d.get("version") != SCHEMA_VERSION:
            raise ValueError(f"not a version-{SCHEMA_VERSION} {_SCHEMA} document")
        return cls(channels=[ChannelChange(**c) for c in d["channels"]],
                   routes=[RouteChange(**r) for r in d["routes"]],
                   routes_other=[RouteChange(**r) for r in d["routes_other"]], modules=d["modules"],
                   circuits=d["circuits"], labels=d["labels"], meta=d["meta"])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/diff.json`` atomically."""
        directory = Path(directory)
        write_json(directory / "diff.json", self.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ModelDiff:
        meta = read_versioned_json(directory, "diff.json", _SCHEMA, "ModelDiff.save")
        with reading(Path(directory) / "diff.json", "ModelDiff.save"):
            return cls.from_json(meta)

    def plot(self, graph: ChannelGraph, path: str | os.PathLike | None = None, *, n_routes: int = 15) -> Any:
        """The graph's layer layout, channels shaded by energy moved (red) and the
        ``n_routes`` most changed routes drawn (red: stronger, blue: weaker; width by change)."""

        plt = pyplot(path is not None)
        layout = Layout(graph, graph.partition_nodes(io=True))
        cmap = plt.get_cmap("Reds")
        score: dict[str, float] = {}
        for c in self.channels:
            score[c.channel] = max(score.get(c.channel, 0.0), c.score)
        colors = {n: cmap(0.15 + 0.85 * s) for n, s in score.items() if s > 1e-3 and n in layout.pos}
        routes = [r for r in self.top_routes(n_routes) if abs(r.delta) > ROUTE_TOL]
        biggest = max((abs(r.delta) for r in routes), default=1.0) or 1.0
        edges = [(r.writer, graph.owner(r.port), 0.5 + 5 * abs(r.delta) / biggest,
                  "tab:red" if r.delta > 0 else "tab:blue") for r in routes
                 if r.writer in layout.pos and graph.owner(r.port) in layout.pos]
        w, h = layout.size()
        _, ax = plt.subplots(figsize=(w, h))
        m = self.meta
        layout.draw(ax, edges, colors, f"{m.get('label_a', 'a')} → {m.get('label_b', 'b')}: channels by energy moved "
                    f"out of the other subspace (darker = more); top {len(edges)} route changes (red up, blue down)")
        if path is not None:
            save_figure(ax.figure, Path(path))
        return ax


# --- inputs ------------------------------------------------------------------------------------------

@dataclass
class _Side:
    graph: ChannelGraph | None = None
    comp: Compression | None = None
    circuits: CircuitSet | None = None
    name: str = "a"


def _check_n(n: int) -> None:
    # a negative n would slice from the end: the list minus its last items, silently
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer (how many to show), got {n!r}")


def _unpack(x: Diffable, circuits: CircuitSet | None, name: str) -> _Side:
    if isinstance(x, (str, os.PathLike)):
        d = Path(x)
        if not d.is_dir():
            raise FileNotFoundError(f"{name}: {d} is not a directory holding graph.json and/or compression.json")
        comp = Compression.load(d) if (d / "compression.json").exists() else None
        graph = ChannelGraph.load(d, compression=comp) if (d / "graph.json").exists() else None
        if comp is None and graph is None:
            raise FileNotFoundError(f"{name}: {d} holds neither graph.json nor compression.json")
        if circuits is None and (d / "circuits.json").exists():
            circuits = CircuitSet.load(d)
        return _Side(graph, comp, circuits, name)
    if isinstance(x, ChannelGraph):
        return _Side(x, x.compression, circuits, name)       # a graph carries no circuits: only circuits_a/_b
    if isinstance(x, Compression):
        return _Side(None, x, circuits, name)
    raise TypeError(f"{name} must be a Compression, a ChannelGraph or a directory saved by them; "
                    f"got {type(x).__name__}")


def _check_architecture(a: _Side, b: _Side) -> None:
    if a.comp is not None and b.comp is not None:
        ca, cb = set(a.comp), set(b.comp)
        if ca != cb:
            raise ValueError(f"the two compressions hold different channels (only in a: {sorted(ca - cb)[:5]}, only "
                             f"in b: {sorted(cb - ca)[:5]}); diff compressions of the same channels of models "
                             "with one architecture")
        for n in ca:
            x, y = a.comp[n], b.comp[n]
            if x.kind != y.kind or set(x.read) != set(y.read):
                raise ValueError(f"channel {n} differs in kind or read ports ({x.kind} {sorted(x.read)} vs "
                                 f"{y.kind} {sorted(y.read)}): the models' architectures differ")
            da, db = x.write.full_decoder.shape[0], y.write.full_decoder.shape[0]
            if da != db:
                raise ValueError(f"d_model differs ({da} vs {db}, channel {n}): the models' architectures differ")
    if a.graph is not None and b.graph is not None:
        ra, rb = set(a.graph.routes("static")), set(b.graph.routes("static"))
        if set(a.graph.channels) != set(b.graph.channels) or ra != rb:
            raise ValueError(f"the two graphs hold different channels or routes ({len(a.graph.channels)} vs "
                             f"{len(b.graph.channels)} channels, {len(ra ^ rb)} routes in one only): build both "
                             "from models of one architecture with the same options (model= given or not)")


def _labels(x: Any, name: str) -> dict[str, str]:
    if x is None:
        return {}
    m = getattr(x, "labels", x)
    if not isinstance(m, Mapping):
        raise TypeError(f"{name} must map unit → text, or have a .labels mapping; got {type(x).__name__}")
    out = {}
    for k, v in m.items():
        text = v if isinstance(v, str) else getattr(v, "text", None)
        if not isinstance(text, str):
            raise TypeError(f"{name}[{k!r}] must be a str or have a .text str; got {type(v).__name__}")
        out[str(k)] = text
    return out


# --- the parts of a diff -------------------------------------------------------------------------------

def _spectrum_change(sa: torch.Tensor, sb: torch.Tensor) -> tuple[float, float]:
    sa, sb = sa.double().clamp_min(0), sb.double().clamp_min(0)
    n = max(len(sa), len(sb))
    pa = torch.zeros(n, dtype=torch.float64)
    pb = torch.zeros(n, dtype=torch.float64)
    pa[: len(sa)], pb[: len(sb)] = sa, sb
    ta, tb = float(pa.sum()), float(pb.sum())
    if ta <= 0 or tb <= 0:
        return (0.0 if ta == tb else 1.0), (1.0 if ta == tb else (math.inf if ta == 0 else 0.0))
    return float((pa / ta - pb / tb).abs().sum() / 2), tb / ta


def _outside(side: Side, basis: torch.Tensor) -> float:
    """Spectrum-weighted mean of ``‖(I - Q Qᵀ) v_i‖²`` over the side's unit directions ``v_i``."""
    vecs = (side.encoder if side.role == "read" else side.decoder).double()
    if side.centered:
        vecs = vecs - vecs.mean(0, keepdim=True)
    w = side.spectrum[: side.rank].double().clamp_min(0)
    if vecs.shape[1] == 0 or w.sum() <= 0:
        return 0.0
    vecs = vecs / vecs.norm(dim=0, keepdim=True).clamp_min(1e-300)
    q = basis.double()
    res = ((vecs - q @ (q.T @ vecs)) ** 2).sum(0).clamp(0, 1)
    return float((w * res).sum() / w.sum())


def _channel_changes(a: Any, b: Any) -> list[ChannelChange]:
    out = []
    for name in a:
        for key, sa in a[name].sides.items():
            sb = b[name].sides[key]
            theta = principal_angles(sa.basis, sb.basis)
            deg = torch.rad2deg(theta)
            spec, ratio = _spectrum_change(sa.spectrum[: sa.rank], sb.spectrum[: sb.rank])
            moved = (_outside(sa, sb.basis) + _outside(sb, sa.basis)) / 2
            out.append(ChannelChange(channel=name, side=key, energy_moved=moved,
                                     max_angle=float(deg.max()) if len(deg) else 0.0,
                                     mean_sin2=float((theta.sin() ** 2).mean()) if len(theta) else 0.0,
                                     angles=[round(float(x), 6) for x in deg], rank_a=sa.rank, rank_b=sb.rank,
                                     spectrum_change=spec, energy_ratio=ratio))
    out.sort(key=lambda c: (-c.score, -(c.max_angle or 0.0), c.channel, c.side))
    return out


def _node_changes(ga: Any, gb: Any) -> list[ChannelChange]:
    """Without compressions: ranks and energies stored on the graph nodes."""
    out = []
    for n, d in ga.nx.nodes(data=True):
        e = gb.nx.nodes[n]
        for key, rank, energy in (("write", "write_rank", "write_energy"), ("read", "read_rank", "read_energy")):
            if rank not in d:
                continue
            side = key if d["kind"] != "port" else f"read:{d['path']}"
            channel = d.get("channel", n)
            ea, eb = float(d.get(energy, 0.0)), float(e.get(energy, 0.0))
            out.append(ChannelChange(channel=channel, side=side, max_angle=None, mean_sin2=None, angles=None,
                                     rank_a=int(d[rank]), rank_b=int(e[rank]),
                                     spectrum_change=abs(eb - ea) / max(ea, eb, 1e-300),
                                     energy_ratio=eb / ea if ea > 0 else (1.0 if eb == 0 else math.inf)))
    out.sort(key=lambda c: (-c.score, c.channel, c.side))
    return out


def _route_changes(ga: Any, gb: Any, weight: str) -> list[RouteChange]:
    ra, rb = ga.routes(weight), gb.routes(weight)
    ta = sum(abs(v) for v in ra.values()) or 1.0
    tb = sum(abs(v) for v in rb.values()) or 1.0
    # b's scale relative to a: the median ratio over routes alive in both, so that a global
    # rescaling is no change and one planted change leaves every other route's share as it was
    # (dividing by each graph's total would shift every share when one route grows)
    floor = 1e-9 * max(max(map(abs, ra.values()), default=0.0), max(map(abs, rb.values()), default=0.0))
    ratios = [abs(rb[k]) / abs(v) for k, v in ra.items() if abs(v) > floor and abs(rb[k]) > floor]
    scale = float(np.median(ratios)) if ratios else tb / ta
    out = [RouteChange(writer=w, port=p, weight=weight, a=float(ra[(w, p)]), b=float(rb[(w, p)]),
                       share_a=float(ra[(w, p)]) / ta, share_b=float(rb[(w, p)]) / (scale * ta)) for (w, p) in ra]
    out.sort(key=lambda r: (-abs(r.delta), r.writer, r.port))
    return out


def _module_changes(ga: Any, gb: Any, weight: str) -> dict[str, Any]:
    from scipy.optimize import linear_sum_assignment  # scipy loads on first use (import tl_modular stays quick)

    ma, mb = ga.modules(weight=weight), gb.modules(weight=weight)
    la = {n: i for i, m in enumerate(ma) for n in m}
    lb = {n: i for i, m in enumerate(mb) for n in m}
    common = sorted(set(la) & set(lb))
    # match modules of a to modules of b by overlap, so that relabelling is no change
    overlap = np.zeros((len(ma), len(mb)))
    for n in common:
        overlap[la[n], lb[n]] += 1
    rows, cols = linear_sum_assignment(-overlap)
    match = dict(zip(rows.tolist(), cols.tolist(), strict=True))
    moved = [n for n in common if match.get(la[n]) != lb[n]]
    order = {n: ga.nx.nodes[n]["order"] for n in moved}
    moved.sort(key=lambda n: (order[n], n))
    ari = adjusted_rand_index([la[n] for n in common], [lb[n] for n in common]) if common else 1.0
    return {"weight": weight, "n_a": len(ma), "n_b": len(mb), "ari": ari, "moved": moved,
            "moves": {n: [la[n], lb[n]] for n in moved},
            "modules_a": [sorted(m) for m in ma], "modules_b": [sorted(m) for m in mb]}


def _circuit_changes(ca: Any, cb: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for cat in ca:
        if cat not in cb:
            continue
        a, b = set(ca[cat].routes), set(cb[cat].routes)
        rank_b = {r: i for i, r in enumerate(cb[cat].routes)}
        rank_a = {r: i for i, r in enumerate(ca[cat].routes)}
        out[cat] = {"size_a": len(a), "size_b": len(b), "jaccard": len(a & b) / max(len(a | b), 1),
                    "gained": [list(r) for r in sorted(b - a, key=rank_b.get)],
                    "lost": [list(r) for r in sorted(a - b, key=rank_a.get)],
                    "faithfulness_a": ca[cat].faithfulness, "faithfulness_b": cb[cat].faithfulness}
    return dict(sorted(out.items(), key=lambda kv: kv[1]["jaccard"]))


def diff(a: Diffable, b: Diffable, labels_a: Any = None, labels_b: Any = None, *, circuits_a: CircuitSet | None = None,
         circuits_b: CircuitSet | None = None, weight: str | None = None, modules: bool = True,
         null: Sequence[Diffable] | None = None, names: tuple[str, str] = ("a", "b")) -> ModelDiff:
    """What changed from model ``a`` to model ``b`` (same architecture).

    Args:
        a, b: Two :class:`~tl_modular.Compression`\\ s, two :class:`~tl_modular.ChannelGraph`\\ s, or
            directories saved by them (``circuits.json`` beside ``graph.json`` is picked up). Channel
            angles need compressions (a graph built in this session, or loaded with
            ``compression=``, carries its own); route and module changes need graphs.
        labels_a, labels_b: Unit → text mappings, or objects with a ``.labels`` mapping whose values
            have ``.text``.
        circuits_a, circuits_b: :class:`~tl_modular.circuits.CircuitSet`\\ s per model.
        weight: Route strength ranked first (default ``"data"`` when both graphs have it, else
            ``"static"``); the other is kept in ``routes_other``.
        modules: Compare the graphs' modules (a Gomory–Hu tree per graph).
        null: Graphs (or compressions, or directories) of null models, built exactly as ``b``'s
            was (same data and options) from the copies :func:`diff_null` gives. Every route and
            channel side then gets ``z``: its change over the RMS of its changes from ``a`` to the
            null models (floored at ``NULL_FLOOR`` of the median RMS), and both lists are ranked
            by ``|z|``: the changes bigger than an untargeted change of the same size would make.
        names: What to call the two models in the summary and plot.

    Returns:
        A :class:`ModelDiff`, biggest changes first.

    >>> d = tlm.diff(comp_before, comp_after)      # doctest: +SKIP
    >>> d.top_channels(3)                          # doctest: +SKIP
    """
    sa, sb = _unpack(a, circuits_a, "a"), _unpack(b, circuits_b, "b")
    _check_architecture(sa, sb)
    out = ModelDiff(meta={"label_a": names[0], "label_b": names[1]})
    if sa.comp is not None and sb.comp is not None:
        out.channels = _channel_changes(sa.comp, sb.comp)
        out.meta["n_channels"] = len(sa.comp)
    elif sa.graph is not None and sb.graph is not None:
        out.channels = _node_changes(sa.graph, sb.graph)
        out.meta["n_channels"] = len(sa.graph.partition_nodes(io=False))
    else:
        raise ValueError("diff needs two compressions or two graphs (one of each compares nothing)")
    if sa.graph is not None and sb.graph is not None:
        has_data = sa.graph.config.get("weight") == "data" and sb.graph.config.get("weight") == "data"
        weight = weight or ("data" if has_data else "static")
        if weight not in ("data", "static") or (weight == "data" and not has_data):
            raise ValueError(f"weight must be 'static', or 'data' when both graphs have data strengths; got {weight!r}")
        out.routes = _route_changes(sa.graph, sb.graph, weight)
        other = "static" if weight == "data" else "data"
        if other == "static" or has_data:
            out.routes_other = _route_changes(sa.graph, sb.graph, other)
        out.meta.update(n_routes=len(out.routes), weight=weight)
        if modules:
            out.modules = _module_changes(sa.graph, sb.graph, weight)
    if null is not None:
        _against_null(out, sa, [_unpack(x, None, f"null[{i}]") for i, x in enumerate(null)])
    if sa.circuits is not None and sb.circuits is not None:
        out.circuits = _circuit_changes(sa.circuits, sb.circuits)
    la, lb = _labels(labels_a, "labels_a"), _labels(labels_b, "labels_b")
    out.labels = [{"unit": u, "a": la.get(u), "b": lb.get(u)} for u in sorted(set(la) | set(lb))
                  if la.get(u) != lb.get(u)]
    return out


# --- the null: changes of the same size in no particular direction ------------------------------------

def diff_null(model_a: Any, model_b: Any, n: int = 4, *, seed: int = 0) -> Iterator[Any]:
    """``n`` copies of ``model_a``, each moved as far as ``model_b`` is from it, in random directions.

    Every parameter tensor becomes ``p_a + ‖p_b - p_a‖ · u`` with ``u`` a uniformly random unit
    direction of its shape, so each tensor moves exactly as far as it did from ``a`` to ``b`` (those
    that did not change stay as they are). Build each copy's graph the way ``b``'s was built and
    pass them as ``diff(a, b, null=...)``: the null says how much each route and channel changes
    when the model moves by as much as it did, but not towards anything. Yields one copy at a time,
    so memory holds one extra model; the inputs are not modified.

    >>> null = [graph_of(m) for m in tlm.diff_null(model, tuned, n=4)]   # doctest: +SKIP
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive number of null models, got {n!r}")
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    if pa.keys() != pb.keys() or any(pa[k].shape != pb[k].shape for k in pa):
        odd = sorted(set(pa) ^ set(pb)) or [k for k in pa if pa[k].shape != pb[k].shape]
        raise ValueError(f"the two models' parameters differ ({odd[:3]}...): diff_null needs two checkpoints of "
                         "one architecture")
    with torch.no_grad():
        steps = {k: float((pb[k].double() - pa[k].double().to(pb[k].device)).norm()) for k in pa}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        copy_ = copy.deepcopy(model_a)
        with torch.no_grad():
            for k, p in copy_.named_parameters():
                if steps[k] > 0:   # no noise drawn for tensors b left alone (GPT-2's embedding is 38M floats)
                    u = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                    p.add_((u * (steps[k] / float(u.norm().clamp_min(1e-300)))).to(p))
        yield copy_


def _zscores(values: Mapping[Any, float], chance: Sequence[Mapping[Any, float]], tol: float) -> dict[Any, float]:
    keys = list(values)
    rms = np.sqrt(np.mean([[c[k] ** 2 for k in keys] for c in chance], 0))
    floor = max(NULL_FLOOR * float(np.median(rms)), tol) if len(keys) else tol
    return {k: float(values[k] / max(s, floor)) for k, s in zip(keys, rms, strict=True)}


def _against_null(out: ModelDiff, sa: _Side, nulls: list[_Side]) -> None:
    if not nulls:
        raise ValueError("null= holds no null models; pass graphs of tlm.diff_null(model_a, model_b, n=4) copies")
    for sn in nulls:
        _check_architecture(sa, sn)
    for lst in (out.routes, out.routes_other):
        if not lst:
            continue
        if any(sn.graph is None for sn in nulls):
            raise ValueError("route changes need a graph per null model: build each diff_null copy's graph as b's was")
        weight = lst[0].weight
        if weight == "data" and any(sn.graph.config.get("weight") != "data" for sn in nulls):
            raise ValueError("the null graphs lack data strengths: build them with tokens, as b's was")
        chance = [{r.route: r.delta for r in _route_changes(sa.graph, sn.graph, weight)} for sn in nulls]
        z = _zscores({r.route: r.delta for r in lst}, chance, ROUTE_TOL)
        for r in lst:
            r.z = z[r.route]
        lst.sort(key=lambda r: (-abs(r.z), r.writer, r.port))
    if out.channels:
        if out.channels[0].max_angle is not None:
            if any(sn.comp is None for sn in nulls):
                raise ValueError("channel changes need a compression per null model (a graph built this session "
                                 "carries one; pass compression= when loading)")
            chance = [{(c.channel, c.side): c.score for c in _channel_changes(sa.comp, sn.comp)} for sn in nulls]
        else:
            chance = [{(c.channel, c.side): c.score for c in _node_changes(sa.graph, sn.graph)} for sn in nulls]
        z = _zscores({(c.channel, c.side): c.score for c in out.channels}, chance, 1e-6)
        for c in out.channels:
            c.z = z[(c.channel, c.side)]
        out.channels.sort(key=lambda c: (-c.z, -c.score, c.channel, c.side))
    out.meta["n_null"] = len(nulls)
