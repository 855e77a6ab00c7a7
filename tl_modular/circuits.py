"""Circuits per kind of input: which routes of the channel graph each category of data uses.

``graph.circuits(model, {"induction": task, "text": tokens})`` scores every route of a
:class:`~tl_modular.graph.ChannelGraph` per example by attribution patching through the
compressed subspaces (one forward and one backward pass per batch), learns which routes each
category needs jointly (a relaxed mask over routes, as in edge pruning), and verifies circuits by
real route patching: everything *outside* the circuit gets its baseline value (a task's corrupted
run, or the data mean) and the metric is measured.

The circuit is the smallest prefix of a route order reaching the faithfulness target, then pruned
route by route (each drop verified by patching); of the two orders — the learnt mask's and the
attribution scores' — the smaller circuit is kept.

- ``faithfulness(k) = (m_k - m_empty) / (m_clean - m_empty)``: how much of the clean metric the
  top-``k`` routes alone keep (``m_empty``: every route patched);
- ``completeness = (m_clean - m_without) / (m_clean - m_empty)``: how much is lost when the circuit's
  own routes are patched (the rest intact);
- 95% bootstrap intervals over examples for both, and the faithfulness of random circuits of the
  same size.

A category is a :class:`~tl_modular.Task` (its metric, corrupted baseline by default) or plain
``[batch, pos]`` tokens (metric: minus the mean next-token loss; baseline: the data mean).

>>> circuits = graph.circuits(model, {n: g(256) for n, g in tlm.toy.GENERATORS.items()})  # doctest: +SKIP
>>> circuits["induction"].routes[:3], circuits.similarity()                               # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from tl_modular import _dist
from tl_modular._io import SCHEMA_VERSION, ArtifactError, read_versioned_json, reading, write_json
from tl_modular._names import split_port
from tl_modular._stats import adjusted_rand_index, kmeans
from tl_modular._tokens import check_tokens
from tl_modular.graph import routes as _routes
from tl_modular.graph.views import Layout, pyplot, save_figure
from tl_modular.patching import capture_writes, patch_routes
from tl_modular.segmentation import ChannelSet, segment
from tl_modular.tasks.task import Task

if TYPE_CHECKING:      # annotations only: tl_modular.graph calls find_circuits (ChannelGraph.circuits)
    from tl_modular.graph import ChannelGraph

__all__ = ["Circuit", "CircuitSet", "adjusted_rand_index", "find_circuits"]

Route = tuple[str, str]
Baseline = Literal["corrupted", "mean"]
Search = Literal["mask", "greedy"]
_SCHEMA = "tl_modular.CircuitSet"


@dataclass
class Circuit:
    """One category's circuit: its routes (strongest first) and how well it stands on its own."""

    category: str
    routes: list[Route]
    scores: dict[Route, float]            # mean first-order metric drop when the route is patched
    curve: list[dict[str, float]]         # {"size", "fraction", "faithfulness"} along the greedy order
    target: float
    faithfulness: float
    faithfulness_interval: tuple[float, float]
    completeness: float
    completeness_interval: tuple[float, float]
    random_faithfulness: list[float] = field(default_factory=list)
    n_examples: int = 0
    usage: np.ndarray | None = None       # [examples, channels]: share of each example's |scores| per channel
    search: str = "greedy"                # the order the circuit grew from: "mask" or "greedy" (see find_circuits)

    @property
    def size(self) -> int:
        return len(self.routes)

    @property
    def channels(self) -> set[str]:
        """Channels the circuit's routes leave from or arrive at (ports collapsed)."""
        return {w for w, _ in self.routes} | {split_port(p)[0] for _, p in self.routes}

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "routes": [list(r) for r in self.routes],
                "scores": [[w, p, s] for (w, p), s in self.scores.items()], "curve": self.curve,
                "target": self.target, "faithfulness": self.faithfulness,
                "faithfulness_interval": list(self.faithfulness_interval), "completeness": self.completeness,
                "completeness_interval": list(self.completeness_interval),
                "random_faithfulness": self.random_faithfulness, "n_examples": self.n_examples,
                "usage": None if self.usage is None else np.round(self.usage, 6).tolist(), "search": self.search}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Circuit:
        return cls(category=d["category"], routes=[tuple(r) for r in d["routes"]],
                   scores={(w, p): s for w, p, s in d["scores"]}, curve=d["curve"], target=d["target"],
                   faithfulness=d["faithfulness"], faithfulness_interval=tuple(d["faithfulness_interval"]),
                   completeness=d["completeness"], completeness_interval=tuple(d["completeness_interval"]),
                   random_faithfulness=d["random_faithfulness"], n_examples=d["n_examples"],
                   usage=None if d.get("usage") is None else np.asarray(d["usage"], dtype=float),
                   search=d.get("search", "greedy"))


class CircuitSet(Mapping[str, Circuit]):
    """Circuits by category, with what they share."""

    def __init__(self, circuits: Mapping[str, Circuit], n_routes: int, channels: Sequence[str] = (),
                 graph_digest: str | None = None) -> None:
        self._circuits = dict(circuits)
        self.n_routes = n_routes
        self.channels = list(channels)   # the columns of every circuit's ``usage``
        # ChannelGraph.digest() of the graph they were found on: a load beside another graph is refused
        self.graph_digest = graph_digest

    def __getitem__(self, name: str) -> Circuit:
        return self._circuits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._circuits)

    def __len__(self) -> int:
        return len(self._circuits)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {c.size} routes, faithfulness {c.faithfulness:.2f}" for n, c in self.items())
        return f"CircuitSet({parts})"

    def shared(self) -> set[Route]:
        """Routes in every category's circuit."""
        sets = [set(c.routes) for c in self.values()]
        return set.intersection(*sets) if sets else set()

    def specific(self) -> dict[str, set[Route]]:
        """Routes in one category's circuit and no other."""
        out = {}
        for name, c in self.items():
            others = set().union(*(set(o.routes) for n, o in self.items() if n != name))
            out[name] = set(c.routes) - others
        return out

    def similarity(self) -> tuple[list[str], np.ndarray]:
        """``(names, matrix)``: pairwise Jaccard similarity of the circuits' route sets."""
        names = list(self)
        m = np.eye(len(names))
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                a, b = set(self[names[i]].routes), set(self[names[j]].routes)
                m[i, j] = m[j, i] = len(a & b) / max(len(a | b), 1)
        return names, m

    def example_clusters(self, k: int | None = None, *, seed: int = 0) -> dict[str, Any]:
        """Cluster every example of every category by the channels it uses (k-means on the rows of
        ``usage``, square-rooted and standardized per channel; ``k`` defaults to the number of
        categories).

        Returns ``{"labels": {category: [cluster per example]}, "k", "purity", "ari"}``: purity is the
        fraction of examples in a cluster whose majority category is theirs, ``ari`` the adjusted
        Rand index between clusters and categories.
        """
        if any(c.usage is None for c in self.values()):
            raise ValueError("these circuits hold no per-example usage (computed by graph.circuits)")
        # square roots (a Hellinger-style view of the shares), then every channel standardized so
        # that small channels count as much as the MLPs every task uses (measured best of raw,
        # sqrt, standardized and both on the bundled model: ARI 0.48, 0.54, 0.56, 0.62)
        x = np.sqrt(np.concatenate([c.usage for c in self.values()]))
        x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
        truth = np.concatenate([np.full(len(c.usage), i) for i, c in enumerate(self.values())])
        k = len(self) if k is None else int(k)
        labels = kmeans(x, k, np.random.default_rng(seed))
        majority = sum(np.bincount(truth[labels == j]).max() for j in np.unique(labels))
        out, start = {}, 0
        for name, c in self.items():
            out[name] = labels[start:start + len(c.usage)].tolist()
            start += len(c.usage)
        return {"labels": out, "k": k, "purity": float(majority / len(x)),
                "ari": adjusted_rand_index(truth, labels)}

    def plot(self, graph: ChannelGraph, path: str | os.PathLike | None = None) -> Any:
        """Each category's circuit on the layer layout (routes shared by all in red, routes only this
        category uses in blue); saves to ``path`` when given and returns the axes."""
        return plot_circuits(self, graph, None if path is None else Path(path))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/circuits.json`` (beside a saved ``graph.json``; it records the digest of
        the graph the circuits were found on, checked by :meth:`load`)."""
        directory = Path(directory)
        write_json(directory / "circuits.json", {"schema": _SCHEMA, "version": SCHEMA_VERSION,
                                                 "n_routes": self.n_routes, "channels": self.channels,
                                                 "graph_digest": self.graph_digest,
                                                 "circuits": [c.to_json() for c in self.values()]})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, graph: ChannelGraph | None = None) -> CircuitSet:
        """Read circuits written by :meth:`save`; refused (:class:`~tl_modular.errors.ArtifactError`)
        when they were found on another graph than ``graph`` or, by default, than the ``graph.json``
        beside them (e.g. a report re-run interrupted after the graph was saved anew).

        >>> circuits = tlm.circuits.CircuitSet.load("tl_modular_report")                 # doctest: +SKIP
        """
        from tl_modular.graph import ChannelGraph

        path, writer = Path(directory) / "circuits.json", "CircuitSet.save"
        meta = read_versioned_json(directory, "circuits.json", _SCHEMA, writer, required=("circuits",))
        with reading(path, writer):
            circuits = cls({d["category"]: Circuit.from_json(d) for d in meta["circuits"]}, meta["n_routes"],
                           meta.get("channels", []), meta.get("graph_digest"))
        beside = Path(directory) / "graph.json"
        if circuits.graph_digest is not None and (graph is not None or beside.exists()):
            found = graph if graph is not None else ChannelGraph.load(directory)
            if found.digest() != circuits.graph_digest:
                other = "the graph given" if graph is not None else str(beside)
                raise ArtifactError(f"{path} and {other} come from different saves: the circuits were found on "
                                    "another graph (a save was interrupted between the graph and the circuits, or "
                                    "the graph was built again); find the circuits again with graph.circuits",
                                    path=path)
        return circuits


# --- drawing ---------------------------------------------------------------------------------------

# here, not in graph.views: a drawing of circuits builds on the graph's layout, as imports point down
# the data flow (diffing draws on it the same way)
def plot_circuits(circuits: CircuitSet, graph: ChannelGraph, path: Path | None) -> Any:
    """One panel per category: its circuit's routes (ports collapsed onto channels), widths by
    score; red routes are in every category's circuit, blue ones in this category's only."""
    plt = pyplot(path is not None)
    layout = Layout(graph, graph.partition_nodes(io=True))
    shared, specific = circuits.shared(), circuits.specific()
    w, h = layout.size()
    fig, axes = plt.subplots(len(circuits), 1, figsize=(w, h * len(circuits)), squeeze=False)
    for ax, (name, c) in zip(axes[:, 0], circuits.items(), strict=True):
        biggest = max((abs(c.scores[r]) for r in c.routes), default=1.0) or 1.0
        edges = []
        for r in c.routes:
            color = "tab:red" if r in shared else "tab:blue" if r in specific[name] else "0.45"
            edges.append((r[0], graph.owner(r[1]), 0.5 + 4 * abs(c.scores[r]) / biggest, color))
        used = {n for u, v, _, _ in edges for n in (u, v)}
        layout.draw(ax, edges, {n: "0.85" for n in used},
                    f"{name}: {c.size} routes, faithfulness {c.faithfulness:.2f} (red: shared by all; blue: only here)")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return axes[:, 0]


# --- one category ----------------------------------------------------------------------------------

@dataclass
class _Category:
    """A category in one form: clean tokens, baseline writes per sender, a per-example metric."""

    name: str
    tokens: torch.Tensor
    metric: Any                       # logits [b, p, v], index slice -> per-example values [b]
    baseline: Mapping[str, torch.Tensor]


def _category(name: str, data: Task | torch.Tensor, model: Any, channels: ChannelSet, senders: list[str],
              writers: Mapping[str, Any], baseline: Baseline) -> _Category:
    if isinstance(data, Task):
        task = data

        def metric(logits: torch.Tensor, index: slice) -> torch.Tensor:
            return task[index].metric(logits, per_example=True)

        if baseline == "corrupted":
            source = capture_writes(model, channels, task.corrupted, senders)
        else:
            source = _mean_source(model, channels, task.clean, senders, writers)
        return _Category(name, task.clean, metric, source)
    if not isinstance(data, torch.Tensor) or data.ndim != 2:
        raise TypeError(f"category {name!r}: pass a tlm.Task or a [batch, pos] token tensor")
    if baseline == "corrupted":
        raise ValueError(f"category {name!r} is plain tokens: it has no corrupted run; use baseline='mean'")
    tokens = data

    def loss_metric(logits: torch.Tensor, index: slice) -> torch.Tensor:
        t = tokens[index].to(logits.device)
        logp = logits[:, :-1].log_softmax(-1).gather(-1, t[:, 1:, None])[..., 0]
        return logp.mean(-1)                                  # minus the mean next-token loss

    return _Category(name, tokens, loss_metric, _mean_source(model, channels, tokens, senders, writers))


@torch.no_grad()
def _mean_source(model: Any, channels: ChannelSet, tokens: torch.Tensor, senders: list[str],
                 writers: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Each sender's clean write with every position but the first set to its data mean."""
    writes = capture_writes(model, channels, tokens, senders)
    out = {}
    for name, x in writes.items():
        x = x.clone()
        x[:, 1:] = writers[name].mean.to(x)
        out[name] = x
    return out


def _scores(model: Any, channels: ChannelSet, graph: ChannelGraph, cat: _Category, routes: list[Route],
            batch_size: int, chunk: int, steps: int = 0) -> np.ndarray:
    """``[examples, routes]``: first-order drop of each example's metric when each route is patched
    to the baseline through the subspaces: the gradient at each port times (clean - baseline) write.

    ``steps = 0``: the gradient of the clean run (attribution patching). ``steps > 0``: integrated
    gradients — the mean gradient over ``steps`` runs whose embeddings sit at the midpoints between
    the clean and the baseline embeddings (EAP-IG on the inputs, Hanna et al. 2024).
    """
    comp = graph.compression
    ws = _routes.writers(comp, channels, cat.tokens)
    rs = _routes.readers(comp, model)
    w_index = {w.name: i for i, w in enumerate(ws)}
    r_index = {r.port: j for j, r in enumerate(rs)}
    pick = [(w_index[w], r_index[p]) for w, p in routes]
    embeds = [(c.source_hook, c.name) for c in channels.of_kind("embed", "pos_embed") if c.name in cat.baseline]
    out = []
    device = model.cfg.device
    # passes of as many examples as fit in memory (each example's scores are computed alone either way)
    batch_size = min(batch_size, _routes.rows_per_pass(model, len(ws), len(rs), cat.tokens.shape[1]))
    _dist.check_consistent(f"circuit scores of {cat.name}", model, cat.tokens, None, batch_size=batch_size,
                           routes=routes, steps=steps)
    for start in _dist.batch_starts(len(cat.tokens), batch_size):     # this rank's share; rows gathered below
        index = slice(start, start + batch_size)
        batch = cat.tokens[index].to(device)
        objective = lambda logits, i=index: cat.metric(logits, i).sum()  # noqa: E731
        writes, grads = _routes.forward_backward(model, channels, ws, rs, batch, None, objective)
        if steps > 0:
            grads = {k: torch.zeros_like(v) for k, v in grads.items()}
            for step in range(steps):
                alpha = (step + 0.5) / steps
                hooks = [(hook, lambda a, hook, n=name, al=alpha, i=index: a + al * (cat.baseline[n][i].to(a) - a))
                         for hook, name in embeds]
                _, g = _routes.forward_backward(model, channels, ws, rs, batch, None, objective, hooks)
                for k, v in g.items():
                    grads[k] += v / steps
        base = torch.stack([cat.baseline[w.name][index].to(writes) for w in ws])
        deltas = torch.stack([_routes.project_writer(w, b - x) for w, b, x in zip(ws, base, writes, strict=True)])
        b, p = batch.shape
        full = torch.zeros(b, len(ws), len(rs), dtype=torch.float64)
        for s, per in _routes.per_position(rs, deltas, grads, chunk):
            full[:, :, s:s + per.shape[-1]] = per.reshape(b, p, len(ws), -1).sum(1).cpu()
        # attribution = metric(patched) - metric(clean) to first order; the score is the drop
        out.append(-np.stack([full[:, i, j].numpy() for i, j in pick], 1))
    return np.concatenate(_dist.gather_batches(out))


@torch.no_grad()
def _patched_metric(model: Any, channels: ChannelSet, cat: _Category, routes: Sequence[Route],
                    batch_size: int) -> np.ndarray:
    """Per-example metric with ``routes`` patched to the baseline (all others clean); each rank
    runs its share of the batches under ``torch.distributed``, every rank gets every row."""
    out = []
    for start in _dist.batch_starts(len(cat.tokens), batch_size):
        index = slice(start, start + batch_size)
        batch = cat.tokens[index].to(model.cfg.device)
        if routes:
            source = {w: cat.baseline[w][index] for w in {w for w, _ in routes}}
            logits = patch_routes(model, channels, batch, list(routes), source)
        else:
            logits = model(batch)
        out.append(cat.metric(logits, index).double().cpu().numpy())
    return np.concatenate(_dist.gather_batches(out))


#: Bytes of activations that one forward and backward pass of the learnt mask (the circuit search's
#: default) may keep for its backward: a step's batch of prompts runs in passes of as many prompts as
#: fit (:func:`mask_rows`), their gradients accumulated. At GPT-2-small shape (158 senders) that is 11
#: prompts of 16 tokens per pass: ``analyze``'s 32 prompts in 3 passes; the bundled model's batches
#: stay one pass (bitwise the results of one pass).
MASK_MEMORY = 3 << 30


def mask_rows(model: Any, n_senders: int, n_pos: int, budget: int | None = None) -> int:
    """Prompts of ``n_pos`` tokens that one pass of the learnt mask takes within ``budget`` bytes
    (:data:`MASK_MEMORY` by default); at least one.

    >>> mask_rows(gpt2_small, 158, 16)                                  # doctest: +SKIP
    11
    """
    cfg = model.cfg
    size = torch.finfo(getattr(cfg, "dtype", torch.float32)).bits // 8
    # per token: each sender's write and delta, ~36 residual vectors per head that autograd keeps of
    # a pass with split inputs (the patched q/k/v inputs, their LayerNorms and projections), and the
    # logits with their log-softmax. At GPT-2-small shape 4.4M floats (0.28 GB a prompt of 16 tokens);
    # measured 0.24 GB a prompt in one pass of 16 (benchmarks/circuit_mask_memory.py).
    floats = cfg.d_model * (2 * n_senders + 36 * cfg.n_layers * cfg.n_heads) + 3 * cfg.d_vocab
    return max(1, int((MASK_MEMORY if budget is None else budget) // (floats * size * max(n_pos, 1))))


def _mask_metric(model: Any, channels: ChannelSet, cat: _Category, routes: list[Route], index: slice,
                 keep: torch.Tensor, rows: int) -> torch.Tensor:
    """The mean metric of the prompts ``index`` with each route patched by ``1 - keep``, differentiable
    in ``keep``.

    Within ``rows`` prompts: one pass, whose graph is the result. More: passes of at most ``rows``
    prompts (the activations autograd keeps grow with the prompts), each backward at once; the mean
    is the passes' sums over all prompts, and its gradient w.r.t. the amounts patched the sum of
    theirs, weighted the same. The result carries it as ``m + g · ((1 - keep) - amount)``: the value
    ``m`` exactly, the gradient ``-g`` w.r.t. ``keep``."""
    device = model.cfg.device
    senders = {w for w, _ in routes}

    def run(part: slice, amount: torch.Tensor) -> torch.Tensor:
        source = {w: cat.baseline[w][part] for w in senders}
        logits = patch_routes(model, channels, cat.tokens[part].to(device), routes, source, amount=amount)
        return cat.metric(logits, part).double()

    n = index.stop - index.start
    if n <= rows:
        return run(index, (1 - keep).to(device)).mean()
    parts = -(-n // rows)                                # as few passes as fit, of even sizes
    amount = (1 - keep).detach().to(device).requires_grad_(True)
    total, grad = 0.0, torch.zeros(len(routes), dtype=torch.float64)
    for k in range(parts):
        part = slice(index.start + k * n // parts, index.start + (k + 1) * n // parts)
        m = run(part, amount).sum()
        (g,) = torch.autograd.grad(m, [amount])          # only the amounts: the model's .grad stays untouched
        total += float(m.detach()) / n
        grad += g.double().cpu() / n
    return total + (grad * ((1 - keep).double() - amount.detach().double().cpu())).sum()


def _learn_mask(model: Any, channels: ChannelSet, cat: _Category, routes: list[Route], clean: np.ndarray,
                empty: np.ndarray, target: float, faithful: Any, *, steps: int, batch_size: int,
                check_every: int = 10, penalty: tuple[float, float] = (0.5, 30.0), rows: int | None = None
                ) -> tuple[np.ndarray, list[Route] | None]:
    """Learn which routes a circuit needs by gradient descent on a relaxed mask (edge pruning,
    Bhaskar et al. 2024): each route is patched by ``1 - sigmoid(θ)``, and θ minimises
    ``10 (1 - faithfulness)₊² + λ · kept fraction`` with ``λ`` growing geometrically, so the
    mask first keeps the metric, then sheds routes until the metric starts to go.

    Every ``check_every`` steps the hard mask (``θ > 0``) is verified by real patching; returns the
    final θ and the smallest verified circuit reaching ``target`` (``None`` when none did).
    Routes chosen jointly this way beat a ranking of single-route scores: on the bundled model the
    induction circuit needs 20 routes instead of 26 at faithfulness 0.9.

    A step's batch runs in forward and backward passes of at most ``rows`` prompts
    (:func:`mask_rows` by default: memory bounded by :data:`MASK_MEMORY`).
    """
    n = len(routes)
    theta = torch.full((n,), 3.0, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.1)
    lam0, lam1 = penalty                             # per kept fraction of the routes, first and last step
    starts = list(range(0, len(cat.tokens), batch_size))
    if rows is None:
        rows = mask_rows(model, len({w for w, _ in routes}), cat.tokens.shape[1])
    best: list[Route] | None = None
    for step in range(steps):
        start = starts[step % len(starts)]
        index = slice(start, min(start + batch_size, len(cat.tokens)))
        keep = torch.sigmoid(theta)
        m = _mask_metric(model, channels, cat, routes, index, keep, rows)
        e, c = float(empty[index].mean()), float(clean[index].mean())
        faith = (m - e) / (c - e) if c != e else m * 0
        lam = lam0 * (lam1 / lam0) ** (step / max(steps - 1, 1))
        loss = 10 * (1 - faith).clamp(min=0) ** 2 + lam * keep.sum() / n
        (grad,) = torch.autograd.grad(loss, [theta])    # only θ: the model's .grad stays untouched
        optimizer.zero_grad()
        theta.grad = grad
        optimizer.step()
        if (step + 1) % check_every == 0 or step == steps - 1:
            kept = [r for r, t in zip(routes, theta.tolist(), strict=True) if t > 0]
            if kept and (best is None or len(kept) < len(best)) and faithful(kept)[0] >= target:
                best = kept
    return theta.detach().numpy().astype(np.float64), best


def _grow(order: list[Route], grid: list[int], target: float, faithful: Any, clean: np.ndarray, *,
          prune: bool, prune_limit: int) -> tuple[list[Route], np.ndarray, list[dict[str, float]]]:
    """The smallest prefix of ``order`` reaching ``target`` (a grid, then bisection between its
    points), pruned route by route, weakest first, while the target holds; with the curve along
    the order and the circuit's per-example metric."""
    n = len(order)
    curve, chosen, below = [], None, 0
    for k in grid:
        f, m_k = faithful(order[:k])
        curve.append({"size": k, "fraction": k / n, "faithfulness": f})
        if chosen is None and f >= target:
            chosen = (k, m_k)
        elif chosen is None:
            below = k
    k, m_k = chosen if chosen is not None else (n, clean)
    lo, hi = below, k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        f, m_mid = faithful(order[:mid])
        if f >= target:
            hi, m_k = mid, m_mid
        else:
            lo = mid
    circuit = order[:hi]
    if prune:
        for r in circuit[::-1][:prune_limit]:
            trial = [x for x in circuit if x != r]
            f, m_t = faithful(trial)
            if f >= target:
                circuit, m_k = trial, m_t
    return circuit, m_k, curve


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    d = den.mean()
    return float(num.mean() / d) if d != 0 else float("nan")


def _bootstrap(num: np.ndarray, den: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[float, float]:
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, len(num), len(num))
        vals.append(_ratio(num[i], den[i]))
    vals = np.array([v for v in vals if math.isfinite(v)])
    if not len(vals):
        return float("nan"), float("nan")
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


def find_circuits(graph: ChannelGraph, model: Any, categories: Mapping[str, Task | torch.Tensor], *,
                  baseline: Baseline | None = None, target: float = 0.9, search: Search = "mask",
                  mask_steps: int = 60, sizes: Sequence[int] | None = None,
                  n_boot: int = 200, n_random: int = 10, prune: bool = True, prune_limit: int = 256,
                  ig_steps: int = 0,
                  batch_size: int = 64, seed: int = 0, progress: bool = True) -> CircuitSet:
    """Per-category circuits of ``graph`` (see the module docs); ``graph.circuits`` calls this.

    Args:
        categories: ``{name: Task or [batch, pos] tokens}``.
        baseline: ``"corrupted"`` (tasks only; the default for tasks) or ``"mean"`` (the default
            for tokens).
        target: Faithfulness the circuit must reach: the smallest prefix of the route order that does
            (grid, then bisection), then pruned by trying to drop each route, weakest first (``prune``;
            at most ``prune_limit`` trials, one patched pass each), keeping a drop when the target
            still holds.
        search: The route order. ``"greedy"``: by mean attribution score (one forward and backward
            pass per batch). ``"mask"`` (default): also routes chosen jointly by a relaxed mask learnt
            over ``mask_steps`` forward and backward passes (edge pruning; the smallest verified
            mask first, the rest by attribution); both orders are grown and pruned and the smaller
            circuit is kept (``Circuit.search`` says which). Smaller circuits (the bundled model:
            95 routes over four tasks instead of 117) at a few seconds per category.
        sizes: Circuit sizes to verify (default: a geometric grid up to every route).
        n_boot: Bootstrap resamples of the examples for the intervals.
        n_random: Random circuits of the same size for comparison.
        ig_steps: 0 for attribution patching (one forward and backward pass per batch); else
            integrated gradients over that many interpolation steps of the embeddings.
    """
    graph.check_data(model)
    _check_arguments(model, categories, search, n_boot, n_random, batch_size)
    channels = segment(model)
    routes = sorted(graph.routes("static"))
    senders = sorted({w for w, _ in routes})
    writers = {w.name: w for w in _routes.writers(graph.compression, channels)}
    n = len(routes)
    grid = sorted({int(round(x)) for x in np.geomspace(1, n, 16)} | {n}) if sizes is None else sorted(set(sizes))
    names = graph.partition_nodes(io=True)
    finder = _Finder(model, channels, graph, routes, grid, _touches(graph, routes, names), np.random.default_rng(seed),
                     target=target, search=search, mask_steps=mask_steps, n_boot=n_boot, n_random=n_random,
                     prune=prune, prune_limit=prune_limit, ig_steps=ig_steps, batch_size=batch_size)
    out = {}
    for name, data in tqdm(categories.items(), desc="circuits", disable=not progress or not _dist.is_main()):
        base = baseline or ("corrupted" if isinstance(data, Task) else "mean")
        out[name] = finder.circuit(_category(name, data, model, channels, senders, writers, base))
    return CircuitSet(out, n, names, graph.digest())


def _check_arguments(model: Any, categories: Mapping[str, Task | torch.Tensor], search: str, n_boot: int,
                     n_random: int, batch_size: int) -> None:
    if not categories:
        raise ValueError("pass at least one category: {name: task or tokens}")
    if search not in ("mask", "greedy"):
        raise ValueError(f"search must be 'mask' or 'greedy', got {search!r}")
    if n_boot < 0 or n_random < 0 or batch_size < 1:
        raise ValueError(f"n_boot and n_random must be >= 0 and batch_size >= 1, got n_boot={n_boot}, "
                         f"n_random={n_random}, batch_size={batch_size}")
    empty = [k for k, v in categories.items() if len(v.clean if isinstance(v, Task) else v) == 0]
    if empty:
        raise ValueError(f"categories {empty} hold no examples: give each at least one prompt")
    for key, data in categories.items():
        if isinstance(data, Task):
            check_tokens(data.clean, model=model, name=f"categories[{key!r}].clean")
            check_tokens(data.corrupted, model=model, name=f"categories[{key!r}].corrupted")
        else:
            check_tokens(data, model=model, name=f"categories[{key!r}]")


def _touches(graph: ChannelGraph, routes: list[Route], names: list[str]) -> np.ndarray:
    """``[routes, channels]``: 1 at the two channels each route joins (its writer and its reader's owner)."""
    touches = np.zeros((len(routes), len(names)))
    column = {c: i for i, c in enumerate(names)}
    for i, (w, p) in enumerate(routes):
        touches[i, column[w]] = touches[i, column[graph.owner(p)]] = 1
    return touches


@dataclass
class _Finder:
    """What the search of every category shares: the model, the routes, the options, one random stream."""

    model: Any
    channels: ChannelSet
    graph: ChannelGraph
    routes: list[Route]
    grid: list[int]
    touches: np.ndarray
    rng: np.random.Generator
    target: float
    search: Search
    mask_steps: int
    n_boot: int
    n_random: int
    prune: bool
    prune_limit: int
    ig_steps: int
    batch_size: int

    def metric(self, cat: _Category, patched: Sequence[Route]) -> np.ndarray:
        """Per-example metric with the ``patched`` routes at their baseline."""
        return _patched_metric(self.model, self.channels, cat, patched, self.batch_size)

    def circuit(self, cat: _Category) -> Circuit:
        """The category's circuit: scored, ordered, grown and pruned, then measured."""
        routes = self.routes
        scores = _scores(self.model, self.channels, self.graph, cat, routes, self.batch_size, chunk=64,
                         steps=self.ig_steps)
        usage = np.abs(scores) @ self.touches                      # [examples, channels]
        usage = usage / np.clip(usage.sum(1, keepdims=True), 1e-300, None)
        mean = scores.mean(0)
        clean = self.metric(cat, [])
        empty = self.metric(cat, routes)
        den = clean - empty

        def faithful(kept: Sequence[Route]) -> tuple[float, np.ndarray]:
            keep = set(kept)
            m = self.metric(cat, [r for r in routes if r not in keep])
            return _ratio(m - empty, den), m

        orders = self.orders(cat, mean, clean, empty, faithful)
        # each order grown and pruned; the smallest circuit wins (ties: the learnt mask)
        grown = {how: _grow(order, self.grid, self.target, faithful, clean, prune=self.prune,
                            prune_limit=self.prune_limit) for how, order in orders.items()}
        found = min(grown, key=lambda how: (len(grown[how][0]), how != self.search))
        circuit, m_k, curve = grown[found]
        without = self.metric(cat, circuit)
        randoms = [faithful(self.random_routes(len(circuit)))[0] for _ in range(self.n_random)]
        rng, n_boot = self.rng, self.n_boot
        return Circuit(
            category=cat.name, routes=circuit, scores={r: float(s) for r, s in zip(routes, mean, strict=True)},
            curve=curve, target=self.target, faithfulness=_ratio(m_k - empty, den),
            faithfulness_interval=_bootstrap(m_k - empty, den, rng, n_boot),
            completeness=_ratio(clean - without, den),
            completeness_interval=_bootstrap(clean - without, den, rng, n_boot),
            random_faithfulness=randoms, n_examples=len(cat.tokens), usage=usage, search=found)

    def orders(self, cat: _Category, mean: np.ndarray, clean: np.ndarray, empty: np.ndarray,
               faithful: Any) -> dict[str, list[Route]]:
        """The route orders to grow circuits from: by attribution (``"greedy"``) and, with
        ``search="mask"``, the learnt mask's."""
        routes = self.routes
        attribution = np.lexsort((np.arange(len(routes)), -np.abs(mean)))     # strongest first, stable
        orders = {"greedy": [routes[i] for i in attribution]}
        if self.search == "mask":
            theta, best = _learn_mask(self.model, self.channels, cat, routes, clean, empty, self.target, faithful,
                                      steps=self.mask_steps, batch_size=self.batch_size)
            # the verified mask by θ, then the rest by attribution (θ alone when no mask verified)
            strength = theta if best is None else np.where([r in set(best) for r in routes], 1e6 + theta, 0.0)
            orders["mask"] = [routes[i] for i in np.lexsort((-np.abs(mean), -strength))]
        return orders

    def random_routes(self, k: int) -> set[Route]:
        """``k`` routes drawn at random (without replacement)."""
        return {self.routes[i] for i in self.rng.choice(len(self.routes), size=k, replace=False)}
