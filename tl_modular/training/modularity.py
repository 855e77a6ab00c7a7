"""The modularity loss: a differentiable penalty on communication across module boundaries.

In residual-stream terms a channel *writes* through ``W_O`` (a head) or ``W_out`` (an MLP) and a
later channel *reads* through ``W_Q, W_K, W_V`` or ``W_in`` (after its norm's gain and
centering). The alignment of writer ``i`` with reader ``j`` is ``||Ŵ_write_i · Ŵ_read_j||_F²`` with
each map normalised to unit Frobenius norm, so it lies in ``[0, 1]``, is zero exactly when the
two act on orthogonal subspaces, and is invariant to a global rescaling of the weights and to the
function-preserving rescalings ``W_V·c, W_O/c`` (``W_Q·c, W_K/c``) and, per neuron,
``W_in·c, W_out/c`` (ReLU): an MLP's neurons are normalised one by one and weighted by their
importance ``||w_in,k||·||w_out,k||`` (shared out to sum to one per MLP).

The loss is the cross-module share of the total alignment. Module assignments are fixed
between refreshes (spectral clustering of the alignment matrix, or modules passed in, e.g.
``graph.modules()``); the inner loop has no eigen-solver.

>>> loss = ModularityLoss(n_modules=3)                      # doctest: +SKIP
>>> loss.refresh(model)                                    # doctest: +SKIP
>>> total = lm_loss + 0.1 * loss(model)                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float

from tl_modular._names import head_name, mlp_name, neuron_name, parse

__all__ = ["ModularityLoss", "ModularityLossConfig", "alignment_matrix", "unit_names"]

Level = Literal["channel", "neuron"]
_EPS = 1e-12


@dataclass(frozen=True)
class _Spec:
    """Static structure of a model: what the alignment needs besides the weights."""

    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    attn_only: bool
    parallel: bool
    norm: str | None  # "LN", "LNPre", "RMS", "RMSPre" or None


def _spec(model: Any) -> _Spec:
    cfg = model.cfg
    if getattr(cfg, "act_fn", None) == "solu_ln":
        raise ValueError("ModularityLoss supports elementwise MLP activations; this model uses solu_ln")
    return _Spec(n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp or 0,
                 attn_only=bool(cfg.attn_only), parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
                 norm=cfg.normalization_type)


def _params(model: Any) -> dict[str, torch.Tensor]:
    """Live (differentiable) weights the alignment reads, under flat names."""
    out: dict[str, torch.Tensor] = {}
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            out[f"{layer}.{name}"] = getattr(attn, name)
        for ln in ("ln1", "ln2"):
            w = getattr(getattr(block, ln, None), "w", None)
            if isinstance(w, torch.Tensor):
                out[f"{layer}.{ln}.w"] = w
        mlp = getattr(block, "mlp", None)
        if mlp is not None and not model.cfg.attn_only:
            out[f"{layer}.W_in"] = mlp.W_in
            out[f"{layer}.W_out"] = mlp.W_out
            gate = getattr(mlp, "W_gate", None)
            if isinstance(gate, torch.Tensor):
                out[f"{layer}.W_gate"] = gate
    return out


def unit_names(model: Any, level: Level = "channel") -> list[str]:
    """Names of the alignment's units: ``L{l}.H{h}`` and ``L{l}.MLP`` (``L{l}.MLP.N{k}`` per neuron)."""
    return _units(_spec(model), level)[0]


def _units(spec: _Spec, level: Level) -> tuple[list[str], list[float]]:
    names, order = [], []
    for layer in range(spec.n_layers):
        names += [head_name(layer, h) for h in range(spec.n_heads)]
        order += [2 * layer] * spec.n_heads
        if not spec.attn_only:
            names += [mlp_name(layer)] if level == "channel" else [neuron_name(layer, k) for k in range(spec.d_mlp)]
            n = 1 if level == "channel" else spec.d_mlp
            order += [2 * layer + (0 if spec.parallel else 1)] * n
    return names, order


def _read_map(w: torch.Tensor, gain: torch.Tensor | None, norm: str | None) -> torch.Tensor:
    """A read map ``[..., d_model, k]`` in residual coordinates: the norm's gain folded in and,
    for LayerNorm, its centering (a residual direction along the all-ones vector is never read)."""
    if gain is not None:
        w = gain[:, None] * w
    if norm in ("LN", "LNPre"):
        w = w - w.mean(-2, keepdim=True)
    return w


def _unit_norm(w: torch.Tensor) -> torch.Tensor:
    return w / (w.pow(2).sum((-2, -1), keepdim=True) + _EPS).sqrt()


def alignment_matrix(params: Mapping[str, torch.Tensor], spec: _Spec, level: Level = "channel"
                     ) -> Float[torch.Tensor, "unit unit"]:
    """``A[i, j] = ||Ŵ_write_i · Ŵ_read_j||_F²`` for writer ``i`` earlier than reader ``j`` (else 0).

    A head's read map stacks its normalised ``W_Q, W_K, W_V`` (each weighted 1/√3); an MLP's
    rows and columns are its neurons, normalised one by one and weighted by ``√importance``.
    """
    rows, row_unit, cols, col_unit = [], [], [], []
    unit = 0
    for layer in range(spec.n_layers):
        g1, g2 = params.get(f"{layer}.ln1.w"), params.get(f"{layer}.ln2.w")
        w_o = _unit_norm(params[f"{layer}.W_O"])                                      # [h, d_head, d_model]
        reads = [_unit_norm(_read_map(params[f"{layer}.{n}"], g1, spec.norm)) for n in ("W_Q", "W_K", "W_V")]
        read = torch.cat(reads, -1) / 3**0.5                                         # [h, d_model, 3 d_head]
        for h in range(spec.n_heads):
            rows.append(w_o[h])
            row_unit += [unit] * w_o.shape[1]
            cols.append(read[h])
            col_unit += [unit] * read.shape[-1]
            unit += 1
        if spec.attn_only:
            continue
        w_in = _read_map(params[f"{layer}.W_in"], g2, spec.norm)                    # [d_model, d_mlp]
        w_out = params[f"{layer}.W_out"]                                             # [d_mlp, d_model]
        a = (w_in.pow(2).sum(0) + _EPS).sqrt()
        b = (w_out.pow(2).sum(1) + _EPS).sqrt()
        imp = (a * b) / (a * b).sum()
        rows.append(imp.sqrt()[:, None] * w_out / b[:, None])
        col = imp.sqrt()[None, :] * w_in / a[None, :]
        gate = params.get(f"{layer}.W_gate")
        if gate is not None:  # a gated MLP also reads through its gate; weight both halves 1/√2
            gate = _read_map(gate, g2, spec.norm)
            gate = imp.sqrt()[None, :] * gate / (gate.pow(2).sum(0) + _EPS).sqrt()
            col = torch.cat([col, gate], -1) / 2**0.5
        cols.append(col)
        k = spec.d_mlp
        if level == "channel":
            row_unit += [unit] * k
            col_unit += [unit] * (col.shape[-1])
            unit += 1
        else:
            row_unit += list(range(unit, unit + k))
            col_unit += list(range(unit, unit + k)) * (col.shape[-1] // k)
            unit += k
    write = torch.cat(rows, 0)                                                        # [n_rows, d_model]
    read = torch.cat(cols, -1)                                                        # [d_model, n_cols]
    g = (write @ read).pow(2)
    dev = g.device
    ri = torch.tensor(row_unit, device=dev)
    ci = torch.tensor(col_unit, device=dev)
    per_row = torch.zeros(g.shape[0], unit, dtype=g.dtype, device=dev).index_add_(1, ci, g)
    align = torch.zeros(unit, unit, dtype=g.dtype, device=dev).index_add_(0, ri, per_row)
    order = torch.tensor(_units(spec, level)[1], device=dev)
    return align * (order[:, None] < order[None, :]).to(align.dtype)


@dataclass(kw_only=True)
class ModularityLossConfig:
    """Settings of :class:`ModularityLoss` (validated)."""

    n_modules: int = 4             # as train_modular and the experiment use
    level: Level = "channel"       # "neuron": every MLP neuron is a unit of its own
    soft: bool = False             # soft memberships (softmax over distances to spectral centroids)
    temperature: float = 0.1       # of the soft memberships, in squared spectral-embedding distance
    sparsity: float = 0.0          # weight of a group-lasso term on cross-module alignments
    refresh_every: int = 100       # calls between re-clusterings; 0 = never refresh automatically
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_modules < 2:
            raise ValueError(f"n_modules must be at least 2, got {self.n_modules}")
        if self.level not in ("channel", "neuron"):
            raise ValueError(f"level must be 'channel' or 'neuron', got {self.level!r}")
        if self.temperature <= 0 or self.sparsity < 0 or self.refresh_every < 0:
            raise ValueError("ModularityLossConfig needs temperature > 0, sparsity >= 0 and refresh_every >= 0; "
                             f"got {self}")


class ModularityLoss:
    """Cross-module share of the read/write alignment between channels; call it on a model.

    Args:
        modules: Initial modules (channel-name sets, e.g. ``graph.modules()``, or a
            ``{channel: module}`` mapping); ``None`` clusters the alignment spectrally on the
            first call. Channels outside every module count as modules of their own.
        **config: Fields of :class:`ModularityLossConfig`.

    >>> loss = ModularityLoss(n_modules=3, refresh_every=50)   # doctest: +SKIP
    >>> float(loss(model))                                     # doctest: +SKIP
    0.41
    """

    def __init__(self, modules: Iterable[Iterable[str]] | Mapping[str, int] | None = None, **config: Any) -> None:
        self.config = ModularityLossConfig(**config)
        self.membership: torch.Tensor | None = None    # [unit, module], rows sum to 1
        self.names: list[str] | None = None
        self.calls = 0
        self._modules = modules

    # --- assignments ------------------------------------------------------------------------
    def assign(self, model: Any, modules: Iterable[Iterable[str]] | Mapping[str, int]) -> None:
        """Fix the modules: channel-name sets or ``{channel: module index}``; neurons follow their MLP."""
        if isinstance(modules, Mapping):
            of = {str(k): int(v) for k, v in modules.items()}
        else:
            of = {name: i for i, group in enumerate(modules) for name in group}
        names = unit_names(model, self.config.level)
        extra = max(of.values(), default=-1) + 1
        labels = []
        for name in names:
            channel = parse(name).channel
            if channel not in of:
                of[channel] = extra
                extra += 1
            labels.append(of[channel])
        self._set(names, np.asarray(labels), None)

    @torch.no_grad()
    def refresh(self, model: Any) -> list[frozenset[str]]:
        """Re-cluster from the current weights: spectral clustering of the symmetrised alignment
        (normalised adjacency, top ``n_modules`` eigenvectors, k-means). Returns the modules."""
        from scipy.cluster.vq import kmeans2

        spec = _spec(model)
        align = alignment_matrix({k: v.detach().double() for k, v in _params(model).items()}, spec,
                                 self.config.level).cpu().numpy()
        sym = align + align.T
        deg = sym.sum(1) + 1e-12
        norm = sym / np.sqrt(deg[:, None] * deg[None, :])
        k = min(self.config.n_modules, len(sym))
        _, vecs = np.linalg.eigh(norm)
        emb = vecs[:, -k:]
        emb = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12)
        rng = np.random.default_rng(self.config.seed)
        best = None
        for _ in range(8):  # k-means restarts; keep the tightest
            cent, lab = kmeans2(emb, k, minit="++", seed=rng)
            inertia = ((emb - cent[lab]) ** 2).sum()
            if best is None or inertia < best[0]:
                best = (inertia, cent, lab)
        _, cent, lab = best
        soft = None
        if self.config.soft:
            d2 = ((emb[:, None, :] - cent[None]) ** 2).sum(-1)
            soft = torch.softmax(torch.as_tensor(-d2 / self.config.temperature), -1)
        names = unit_names(model, self.config.level)
        self._set(names, lab, soft)
        return self.modules()

    def _set(self, names: list[str], labels: np.ndarray, soft: torch.Tensor | None) -> None:
        _, labels = np.unique(labels, return_inverse=True)
        self.names = names
        self.membership = soft if soft is not None else torch.nn.functional.one_hot(
            torch.as_tensor(labels), int(labels.max()) + 1).double()

    def modules(self) -> list[frozenset[str]]:
        """The current modules as channel-name sets (hard: each unit's most likely module)."""
        if self.membership is None or self.names is None:
            raise RuntimeError("no modules yet: call refresh(model) or assign(model, modules) first")
        labels = self.membership.argmax(1).tolist()
        groups: dict[int, set[str]] = {}
        for name, lab in zip(self.names, labels, strict=True):
            groups.setdefault(lab, set()).add(name)
        return sorted((frozenset(g) for g in groups.values()), key=lambda s: (-len(s), sorted(s)))

    # --- the loss ---------------------------------------------------------------------------
    def __call__(self, model: Any) -> torch.Tensor:
        """The penalty (a scalar tensor with gradients): cross-module fraction (+ sparsity term)."""
        cfg = self.config
        if self.membership is None:
            if self._modules is not None:
                self.assign(model, self._modules)
            else:
                self.refresh(model)
        elif cfg.refresh_every and self.calls and self.calls % cfg.refresh_every == 0:
            self.refresh(model)
        self.calls += 1
        align = alignment_matrix(_params(model), _spec(model), cfg.level)
        return self.penalty(align)

    def penalty(self, align: torch.Tensor) -> torch.Tensor:
        """The penalty for a given alignment matrix under the current memberships."""
        if self.membership is None or self.membership.shape[0] != align.shape[0]:
            raise RuntimeError("memberships do not match the alignment: call refresh(model) first")
        p = self.membership.to(align)
        cross = 1 - p @ p.T
        out = (align * cross).sum() / (align.sum() + _EPS)
        if self.config.sparsity:
            out = out + self.config.sparsity * ((align + _EPS).sqrt() * cross).sum() / cross.sum().clamp_min(1)
        return out

    @torch.no_grad()
    def cross_fraction(self, model: Any) -> float:
        """Cross-module share of the alignment (at this loss's level) under the current hard modules."""
        if self.membership is None:
            raise RuntimeError("no modules yet: call refresh(model) or assign(model, modules) first")
        align = alignment_matrix({k: v.detach() for k, v in _params(model).items()}, _spec(model),
                                 self.config.level)
        hard = torch.nn.functional.one_hot(self.membership.argmax(1), self.membership.shape[1]).to(align)
        return float((align * (1 - hard @ hard.T)).sum() / (align.sum() + _EPS))
