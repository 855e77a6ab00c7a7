"""Evidence for a unit, built from TransformerLens caches in two streaming passes.

Pass one keeps, per unit and sequence, only the peak (and trough) activation and where it sits —
``[units, sequences]`` numbers, however long the data. The sequences are split once into an
explanation set and a held-out set. Pass two re-runs the model on the chosen sequences alone and
cuts a window around each peak: the top contexts, more sampled across the activation quantiles,
random contexts, the negative tail when it is large, and the held-out top and random contexts
(1:1) the label is scored on. Weight evidence (strongest inputs and outputs) and output evidence
(tokens promoted and suppressed through the unembedding) come from the weights.

>>> ev = collect_evidence(units, model, tokens)           # doctest: +SKIP
>>> ev["L0.MLP.N3"].top[0].tokens, ev["L0.MLP.N3"].top[0].acts   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from tl_modular import _dist
from tl_modular._hooks import run_with_cache
from tl_modular._models import stop_layer as _stop_layer
from tl_modular._names import act_name, neuron_name
from tl_modular._tokens import check_tokens
from tl_modular._tokens import valid_positions as _valid
from tl_modular.labeling._units import Unit


@dataclass(kw_only=True)
class EvidenceConfig:
    """How much evidence to gather per unit.

    Attributes:
        n_top: Top-activating contexts shown to the labeler.
        n_quantile: More activating contexts, sampled evenly across the upper half of the ranking.
        n_random: Random non-activating contexts shown (drawn from the sequences whose peak is
            below the median).
        n_bottom: Contexts of the negative tail of a signed unit, shown when it reaches
            ``negative_ratio`` of the peak.
        n_holdout: Held-out top contexts the label is scored on, with as many random held-out ones.
        holdout_fraction: Share of sequences kept out of the explanation.
        window_before, window_after: Tokens shown before and after each context's peak.
        n_weights: Strongest incoming and outgoing units listed.
        n_tokens: Promoted and suppressed tokens listed.
    """

    n_top: int = 10
    n_quantile: int = 6
    n_random: int = 5
    n_bottom: int = 5
    n_holdout: int = 10
    holdout_fraction: float = 0.3
    window_before: int = 24
    window_after: int = 4
    n_weights: int = 5
    n_tokens: int = 8
    negative_ratio: float = 0.25
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_top", "n_holdout", "window_before", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EvidenceConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_quantile", "n_random", "n_bottom", "window_after", "n_weights", "n_tokens"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"EvidenceConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")


@dataclass
class Context:
    """A window of one sequence with the unit's activation on every token."""

    tokens: list[str]
    acts: list[float]
    row: int
    start: int

    @property
    def peak(self) -> float:
        return max(self.acts)

    @property
    def trough(self) -> float:
        return min(self.acts)

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "start": self.start, "tokens": self.tokens,
                "acts": [round(a, 5) for a in self.acts]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Context:
        return cls(tokens=list(d["tokens"]), acts=[float(a) for a in d["acts"]], row=d["row"], start=d["start"])


@dataclass
class Evidence:
    """Everything the labeler sees about one unit, and the held-out contexts it is scored on."""

    unit: Unit
    top: list[Context] = field(default_factory=list)
    quantile: list[Context] = field(default_factory=list)
    random: list[Context] = field(default_factory=list)
    bottom: list[Context] = field(default_factory=list)
    holdout_top: list[Context] = field(default_factory=list)
    holdout_random: list[Context] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    incoming: list[tuple[str, float]] = field(default_factory=list)
    outgoing: list[tuple[str, float]] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    member_labels: dict[str, str] = field(default_factory=dict)
    mean_write: torch.Tensor | None = field(default=None, repr=False)  # at the top peaks, for channels/modules
    attention: list[dict[str, Any]] = field(default_factory=list)       # heads: keys attended from each top peak

    @property
    def signed(self) -> bool:
        """Whether the negative tail is shown (and simulated on a −10…10 scale)."""
        return bool(self.bottom)

    @property
    def offset(self) -> float:
        """The activation shown as 0: a write norm's mean (norms are never near zero, so their
        typical value is the baseline), else 0."""
        return float(self.stats.get("mean", 0.0)) if self.unit.kind in ("channel", "module") else 0.0

    @property
    def scale(self) -> float:
        """The activation above :attr:`offset` that maps to 10: the largest one shown."""
        off = self.offset
        peaks = [abs(c.peak - off) for c in self.top] + [abs(c.trough - off) for c in self.bottom]
        return max(peaks + [1e-12])

    def levels(self, acts: Sequence[float], *, signed: bool | None = None) -> list[int]:
        """Activations as integers on the prompts' 0…10 scale (−10…10 for signed units)."""
        lo = -10 if (self.signed if signed is None else signed) else 0
        off, scale = self.offset, self.scale
        return [max(lo, min(10, round(10 * (a - off) / scale))) for a in acts]

    def to_json(self, *, holdout: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"unit": self.unit.to_json(), "stats": self.stats,
                               **{k: [c.to_json() for c in getattr(self, k)]
                                  for k in ("top", "quantile", "random", "bottom")},
                               "incoming": [list(p) for p in self.incoming],
                               "outgoing": [list(p) for p in self.outgoing],
                               "promoted": [list(p) for p in self.promoted],
                               "suppressed": [list(p) for p in self.suppressed],
                               "categories": self.categories, "member_labels": self.member_labels,
                               **({"attention": self.attention} if self.attention else {})}
        if holdout:
            out["holdout_top"] = [c.to_json() for c in self.holdout_top]
            out["holdout_random"] = [c.to_json() for c in self.holdout_random]
        return out


# --- token strings ---------------------------------------------------------------------------

def str_tokens(model: Any, tokens: Int[torch.Tensor, "batch pos"]) -> list[list[str]]:
    """Token strings per row: the model's tokenizer when it has one, else ``<id>``."""
    tok = getattr(model, "tokenizer", None)
    rows = tokens.tolist()
    if tok is None:
        return [[f"<{t}>" for t in row] for row in rows]
    return [[tok.decode([t]) for t in row] for row in rows]


# --- pass one: peaks per sequence -------------------------------------------------------------

def _forward(model: Any, batch: torch.Tensor, mask: torch.Tensor | None, hooks: list[str]) -> Any:
    kwargs: dict[str, Any] = {"attention_mask": mask.to(model.cfg.device)} if mask is not None else {}
    stop = _stop_layer(model, hooks)
    if stop is not None:
        kwargs["stop_at_layer"] = stop
    with torch.no_grad():
        _, cache = run_with_cache(model, batch.to(model.cfg.device), names_filter=lambda n: n in hooks,
                                        return_type=None, **kwargs)
    return cache


def _peaks(units: Sequence[Unit], model: Any, tokens: torch.Tensor, mask: torch.Tensor | None,
           cfg: EvidenceConfig, progress: bool) -> dict[str, np.ndarray]:
    n, rows = len(units), tokens.shape[0]
    hooks = sorted({h for u in units for h in u.hooks})
    out = {"max": np.full((n, rows), -np.inf, np.float32), "argmax": np.zeros((n, rows), np.int64),
           "min": np.full((n, rows), np.inf, np.float32), "argmin": np.zeros((n, rows), np.int64),
           "sum": np.zeros(n), "sumsq": np.zeros(n), "count": np.zeros(n)}
    _dist.check_consistent("evidence scan", model, tokens, mask, units=[u.name for u in units],
                           batch_size=cfg.batch_size)
    starts = _dist.batch_starts(rows, cfg.batch_size)      # this rank's share (all without a process group)
    bar = tqdm(total=sum(len(tokens[s:s + cfg.batch_size]) for s in starts), desc="evidence: scan",
               disable=not progress or not _dist.is_main(), leave=False)
    for start in starts:
        batch = tokens[start:start + cfg.batch_size]
        bmask = None if mask is None else mask[start:start + cfg.batch_size]
        keep = _valid(batch, bmask)
        cache = _forward(model, batch, bmask, hooks)
        for i, u in enumerate(units):
            a = u.read(cache, model).detach().float().cpu()
            if a.shape != batch.shape:
                raise ValueError(f"unit {u.name} read a {list(a.shape)} activation; expected [batch, pos] "
                                 f"{list(batch.shape)}")
            if not torch.isfinite(a[keep]).all():
                raise ValueError(f"unit {u.name} has NaN or infinite activations: check the model's weights "
                                 "and the data (overflow in half precision?)")
            hi = a.masked_fill(~keep, -torch.inf).max(1)
            lo = a.masked_fill(~keep, torch.inf).min(1)
            sl = slice(start, start + batch.shape[0])
            out["max"][i, sl], out["argmax"][i, sl] = hi.values.numpy(), hi.indices.numpy()
            out["min"][i, sl], out["argmin"][i, sl] = lo.values.numpy(), lo.indices.numpy()
            v = a[keep].double()
            out["sum"][i] += float(v.sum())
            out["sumsq"][i] += float((v * v).sum())
            out["count"][i] += v.numel()
        bar.update(batch.shape[0])
    bar.close()
    return _merge_peaks(out)


def _merge_peaks(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank's rows and sums in one table: a row's peaks come from the one rank that scanned it
    (the others hold ±inf and index 0 there), so max/min/sum reductions are exact."""
    if not _dist.active():
        return out
    ops = {"max": "max", "min": "min", "argmax": "sum", "argmin": "sum", "sum": "sum", "sumsq": "sum", "count": "sum"}
    merged = {}
    for op in ("max", "min", "sum"):
        part = _dist.all_reduce({k: torch.from_numpy(np.asarray(v)) for k, v in out.items() if ops[k] == op}, op)
        merged.update({k: v.numpy() for k, v in part.items()})
    return merged


# --- choosing contexts -------------------------------------------------------------------------

@dataclass
class _Pick:
    kind: str     # top | quantile | random | bottom | holdout_top | holdout_random
    row: int
    at: int       # the position the window is cut around


def _choose(unit: Unit, i: int, peaks: dict[str, np.ndarray], explain: np.ndarray, holdout: np.ndarray,
            cfg: EvidenceConfig, rng: np.random.Generator) -> list[_Pick]:
    hi, lo = peaks["max"][i], peaks["min"][i]
    picks: list[_Pick] = []

    def add(kind: str, rows: Sequence[int], key: str = "argmax") -> None:
        picks.extend(_Pick(kind, int(r), int(peaks[key][i, r])) for r in rows)

    order = explain[np.argsort(-hi[explain], kind="stable")]
    order = order[np.isfinite(hi[order])]
    top = order[:cfg.n_top]
    add("top", top)
    rest = order[cfg.n_top:]
    if cfg.n_quantile and len(rest):
        ranks = np.unique(np.linspace(0, max(len(rest) // 2, 1) - 1, cfg.n_quantile).round().astype(int))
        add("quantile", rest[ranks])
    used = set(top.tolist()) | {p.row for p in picks}
    # random contexts from the lower half of the ranking: what the unit does *not* respond to
    pool = np.array([r for r in order[len(order) // 2:] if r not in used], dtype=np.int64)
    if cfg.n_random and len(pool):
        add("random", rng.choice(pool, size=min(cfg.n_random, len(pool)), replace=False))
    peak = float(hi[order[0]]) if len(order) else 0.0
    trough = float(np.min(lo[explain])) if len(explain) else 0.0
    if cfg.n_bottom and unit.signed and trough < 0 and -trough >= cfg.negative_ratio * max(peak, 1e-12):
        low = explain[np.argsort(lo[explain], kind="stable")]
        add("bottom", [r for r in low[:cfg.n_bottom] if lo[r] < 0], key="argmin")
    h_order = holdout[np.argsort(-hi[holdout], kind="stable")]
    h_order = h_order[np.isfinite(hi[h_order])]
    h_top = h_order[:cfg.n_holdout]
    add("holdout_top", h_top)
    h_pool = h_order[cfg.n_holdout:]
    if len(h_pool):
        add("holdout_random", rng.choice(h_pool, size=min(len(h_top), len(h_pool)), replace=False))
    return picks


def _window(at: int, valid: np.ndarray, cfg: EvidenceConfig) -> tuple[int, int]:
    pos = np.flatnonzero(valid)
    first, last = int(pos[0]), int(pos[-1])
    start = max(first, at - cfg.window_before)
    return start, min(last, at + cfg.window_after) + 1


# --- weights and outputs ------------------------------------------------------------------------

def _unembed(model: Any, writes: dict[str, torch.Tensor], n: int, chunk: int = 256
             ) -> dict[str, tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Tokens each residual write promotes and suppresses most (through ``ln_final``'s gain),
    ``chunk`` writes per product with the unembedding."""
    w_u = model.W_U.detach()
    kind = getattr(model.cfg, "normalization_type", None)
    ln_w = getattr(getattr(model, "ln_final", None), "w", None)
    tok = getattr(model, "tokenizer", None)
    names = list(writes)
    out = {}
    k = min(n, w_u.shape[1])
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        w = torch.stack([writes[name].detach().to(w_u) for name in part])
        if kind in ("LN", "LNPre"):
            w = w - w.mean(-1, keepdim=True)
        if ln_w is not None:
            w = w * ln_w.detach().to(w_u)
        logits = (w @ w_u).float()
        up, down = logits.topk(k, dim=-1), (-logits).topk(k, dim=-1)
        for row, name in enumerate(part):
            def named(vals: torch.Tensor, idx: torch.Tensor, sign: float) -> list[tuple[str, float]]:
                return [(tok.decode([int(t)]) if tok is not None else f"<{int(t)}>", round(sign * float(v), 4))
                        for v, t in zip(vals.tolist(), idx.tolist(), strict=True)]
            out[name] = (named(up.values[row], up.indices[row], 1.0), named(down.values[row], down.indices[row], -1.0))
    return out


def _neuron_weights(model: Any, units: Sequence[Unit], n: int) -> dict[str, tuple[list, list]]:
    """Virtual weights to earlier and later MLP neurons (``W_out[l'] · ln2.w ⊙ W_in[l]``, centred
    under LayerNorm), for all neuron units of a layer in one product per pair of layers."""
    centre = getattr(model.cfg, "normalization_type", None) in ("LN", "LNPre")
    n_layers = model.cfg.n_layers

    def reads(l_: int) -> torch.Tensor:
        w = model.blocks[l_].mlp.W_in.detach().float()
        ln = getattr(model.blocks[l_], "ln2", None)
        if getattr(ln, "w", None) is not None:
            w = ln.w.detach().float()[:, None] * w
        return w - w.mean(0, keepdim=True) if centre else w

    def best(candidates: list[tuple[torch.Tensor, torch.Tensor, int]], col: int) -> list[tuple[str, float]]:
        pairs = [(neuron_name(l_, int(j)), float(v)) for vals, idx, l_ in candidates
                 for v, j in zip(vals[:, col], idx[:, col], strict=True)]
        return [(k, round(v, 4)) for k, v in sorted(pairs, key=lambda p: -abs(p[1]))[:n]]

    out: dict[str, tuple[list, list]] = {}
    by_layer: dict[int, list[Unit]] = {}
    for u in units:
        by_layer.setdefault(u.info["layer"], []).append(u)
    for layer, us in by_layer.items():
        idx = torch.tensor([u.info["index"] for u in us])
        mine_in = reads(layer)[:, idx]                                   # [d_model, units]
        mine_out = model.blocks[layer].mlp.W_out.detach().float()[idx]   # [units, d_model]
        inc, outg = [], []
        for l_ in range(n_layers):
            if l_ < layer:
                v = model.blocks[l_].mlp.W_out.detach().float() @ mine_in           # [d_mlp, units]
            elif l_ > layer:
                v = (mine_out @ reads(l_)).T                                         # [d_mlp, units]
            else:
                continue
            top = v.abs().topk(min(n, v.shape[0]), dim=0).indices
            (inc if l_ < layer else outg).append((v.gather(0, top), top, l_))
        for col, u in enumerate(us):
            out[u.name] = (best(inc, col), best(outg, col))
    return out


def _graph_weights(graph: Any, unit: Unit, n: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The strongest routes into and out of the unit's channels (outside the unit)."""
    mine = set(unit.channels)
    inc: dict[str, float] = {}
    out: dict[str, float] = {}
    for (writer, port), s in graph.routes().items():
        reader = graph.owner(port)
        if reader in mine and writer not in mine:
            inc[writer] = inc.get(writer, 0.0) + float(s)
        elif writer in mine and reader not in mine:
            out[reader] = out.get(reader, 0.0) + float(s)

    def best(d: dict[str, float]) -> list[tuple[str, float]]:
        return [(k, round(v, 4)) for k, v in sorted(d.items(), key=lambda p: -abs(p[1]))[:n]]
    return best(inc), best(out)


def _categories(circuits: Any, unit: Unit) -> list[str]:
    if circuits is None or not unit.channels:
        return []
    return [name for name, c in circuits.items() if set(unit.channels) & c.channels]


def split_rows(n_rows: int, cfg: EvidenceConfig) -> tuple[np.ndarray, np.ndarray]:
    """The sequences shown to the labeler and those held out for scoring (seeded, disjoint)."""
    perm = np.random.default_rng(cfg.seed).permutation(n_rows)
    n_hold = min(max(1, round(n_rows * cfg.holdout_fraction)), n_rows - 1)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


# --- the whole collection -----------------------------------------------------------------------

def collect_evidence(units: Sequence[Unit], model: Any, tokens: Int[torch.Tensor, "batch pos"], *,
                     attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
                     config: EvidenceConfig | None = None, graph: Any = None, circuits: Any = None,
                     progress: bool = True) -> dict[str, Evidence]:
    """Evidence for every unit (see the module docs), by unit name.

    Args:
        units: What to describe (:mod:`~tl_modular.labeling._units` builds them).
        tokens: ``[batch, pos]`` token ids; each row is one sequence (position 0 is never shown).
        graph: A ChannelGraph, for the strongest routes into and out of channels and modules.
        circuits: A CircuitSet (or ``{category: Circuit}``), for the categories that use a unit.
    """
    cfg = config or EvidenceConfig()
    tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    if not units:
        raise ValueError("no units to collect evidence for")
    if len({u.name for u in units}) != len(units):
        raise ValueError("unit names must be unique")
    rows = tokens.shape[0]
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise ValueError(f"sequences of {tokens.shape[1]} tokens are longer than the model's context ({n_ctx}): "
                         f"split the data into rows of at most {n_ctx} tokens")
    if rows < 4:
        raise ValueError(f"{rows} sequences are too few to hold some out for scoring: pass at least 4 "
                         f"(≥ {2 * (cfg.n_top + cfg.n_holdout)} recommended)")
    peaks = _peaks(units, model, tokens, attention_mask, cfg, progress)
    explain, holdout = split_rows(rows, cfg)
    rng = np.random.default_rng(cfg.seed + 1)

    picks = {u.name: _choose(u, i, peaks, explain, holdout, cfg, rng) for i, u in enumerate(units)}
    evidence = {}
    for i, u in enumerate(units):
        mean = peaks["sum"][i] / max(peaks["count"][i], 1)
        var = max(peaks["sumsq"][i] / max(peaks["count"][i], 1) - mean * mean, 0.0)
        finite = peaks["max"][i][np.isfinite(peaks["max"][i])]
        evidence[u.name] = Evidence(unit=u, stats={"max": float(finite.max()) if finite.size else 0.0,
                                                   "min": float(np.min(peaks["min"][i])),
                                                   "mean": float(mean), "std": float(var ** 0.5),
                                                   "n_tokens": int(peaks["count"][i])})
    _cut_windows(units, model, tokens, attention_mask, picks, evidence, cfg, progress)

    neuron_weights = _neuron_weights(model, [u for u in units if u.kind == "neuron" and "layer" in u.info],
                                     cfg.n_weights) if cfg.n_weights else {}
    writes = {}
    for u in units:
        ev = evidence[u.name]
        if u.name in neuron_weights:
            ev.incoming, ev.outgoing = neuron_weights[u.name]
        elif graph is not None and u.channels:
            ev.incoming, ev.outgoing = _graph_weights(graph, u, cfg.n_weights)
        write = u.write if u.write is not None else ev.mean_write
        if write is not None and float(write.norm()) > 0:
            writes[u.name] = write
        ev.categories = _categories(circuits, u)
    if cfg.n_tokens and writes:
        for name, (up, down) in _unembed(model, writes, cfg.n_tokens).items():
            evidence[name].promoted, evidence[name].suppressed = up, down
    return evidence


def _cut_windows(units: Sequence[Unit], model: Any, tokens: torch.Tensor, mask: torch.Tensor | None,
                 picks: dict[str, list[_Pick]], evidence: dict[str, Evidence], cfg: EvidenceConfig,
                 progress: bool) -> None:
    """Pass two: activations on the chosen sequences only, cut into windows; mean writes at the
    top peaks for units without a fixed write vector."""
    wanted = sorted({p.row for ps in picks.values() for p in ps})
    by_row: dict[int, list[tuple[int, _Pick]]] = {}
    for i, u in enumerate(units):
        for p in picks[u.name]:
            by_row.setdefault(p.row, []).append((i, p))
    hooks = sorted({h for u in units for h in u.hooks})
    writes: dict[str, list[torch.Tensor]] = {}
    # every rank cuts the same few windows (a pass over the chosen rows only, not the data)
    bar = tqdm(total=len(wanted), desc="evidence: contexts", disable=not progress or not _dist.is_main(),
               leave=False)
    for start in range(0, len(wanted), cfg.batch_size):
        rows = wanted[start:start + cfg.batch_size]
        batch = tokens[rows]
        bmask = None if mask is None else mask[rows]
        valid = _valid(batch, bmask).numpy()
        cache = _forward(model, batch, bmask, hooks)
        strings = str_tokens(model, batch)
        needed = {i for r in rows for i, _ in by_row[r]}
        acts = {i: units[i].read(cache, model).detach().float().cpu() for i in needed}
        batch_writes: dict[int, torch.Tensor] = {}
        for b, r in enumerate(rows):
            for i, p in by_row[r]:
                u, ev = units[i], evidence[units[i].name]
                lo, hi = _window(p.at, valid[b], cfg)
                ctx = Context(tokens=strings[b][lo:hi], acts=acts[i][b, lo:hi].tolist(), row=r, start=lo)
                getattr(ev, p.kind).append(ctx)
                if p.kind != "top":
                    continue
                if u.write_reader is not None:
                    if i not in batch_writes:
                        batch_writes[i] = u.write_reader(cache, model).detach().float().cpu()
                    writes.setdefault(u.name, []).append(batch_writes[i][b, p.at])
                if u.pattern is not None:       # where a head looks from its peak
                    layer, head = u.pattern
                    att = cache[act_name("pattern", layer)][b, head, p.at].detach().float().cpu()
                    top = att.topk(min(3, p.at + 1))
                    ev.attention.append({"row": r, "query": strings[b][p.at], "keys": [
                        [strings[b][k], round(float(w), 3), p.at - k]
                        for w, k in zip(top.values.tolist(), top.indices.tolist(), strict=True)]})
        bar.update(len(rows))
    bar.close()
    for ev in evidence.values():   # windows arrive in row order; show them strongest first
        order = {c.row: -c.peak for c in ev.top}
        ev.attention.sort(key=lambda a: order[a["row"]])
        ev.top.sort(key=lambda c: -c.peak)
        ev.quantile.sort(key=lambda c: -c.peak)
        ev.bottom.sort(key=lambda c: c.trough)
        ev.holdout_top.sort(key=lambda c: -c.peak)
    for name, ws in writes.items():
        evidence[name].mean_write = torch.stack(ws).mean(0)
