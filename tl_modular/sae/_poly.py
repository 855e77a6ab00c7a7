"""Polysemanticity measured without humans: how many SAE features drive a unit.

For a unit u reading the SAE's hook through a vector w_u, the SAE writes each token's
activation as ``x = b_dec + Σ_f z_f d_f + error``, so feature f contributes
``c_f = z_f (d_f · w_u)`` (times the token's ``1/σ`` when the unit reads through LayerNorm).
Over the unit's top-activating tokens the share of feature f is ``Σ_t |c_tf| / Σ_t Σ_g |c_tg|``;
the unit's polysemanticity is ``exp(entropy)`` of those shares — the effective number of features
driving it (1 for a unit one feature drives, k for k equal features). The other way round, a
feature's *spread* is the effective number of units it reaches, from ``|d_f · w_u| / ‖w_u‖``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float

from tl_modular._stats import effective_number
from tl_modular.sae._attach import SAESet, check_fits, collect
from tl_modular.sae._readers import Readers, readers_for

if TYPE_CHECKING:
    from sae_lens import SAE

    from tl_modular.compression import Compression


@dataclass
class UnitScores:
    """Polysemanticity of a group of units reading one SAE.

    ``scores[i]`` is unit ``names[i]``'s effective number of features (nan: never active);
    ``top_features[i]`` its strongest features as ``(feature, share)``; ``n_active[i]`` how many of
    its top tokens were active (positive).
    """

    hook: str
    names: list[str]
    scores: np.ndarray
    top_features: list[list[tuple[int, float]]]
    n_active: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def ranked(self, n: int | None = None) -> list[dict[str, Any]]:
        """Rows ``{unit, hook, score, top_features, n_active}``, most polysemantic first (nan last)."""
        order = sorted(range(len(self.names)), key=lambda i: (np.isnan(self.scores[i]), -np.nan_to_num(self.scores[i])))
        return [{"unit": self.names[i], "hook": self.hook, "score": float(self.scores[i]),
                 "top_features": self.top_features[i], "n_active": int(self.n_active[i])} for i in order[:n]]


def feature_contributions(sae: SAE, acts: Float[torch.Tensor, "n d_in"], readers: Float[torch.Tensor, "d_in n_units"],
                          ) -> Float[torch.Tensor, "n d_sae n_units"]:
    """``c[t, f, u] = z_tf (d_f · w_u)`` for every token, feature and unit (small inputs only)."""
    z = sae.encode(acts.to(sae.W_dec.dtype))
    return z[:, :, None] * (sae.W_dec.detach() @ readers.to(sae.W_dec.dtype))[None]


@torch.no_grad()
def polysemanticity(sae: SAE, acts: Float[torch.Tensor, "n d_in"],
                    readers: Readers | Float[torch.Tensor, "d_in n_units"], *,
                    scale: Float[torch.Tensor, " n"] | None = None, top: int | float = 0.1, n_features: int = 5,
                    merge: float | None = 0.95) -> UnitScores:
    """Effective number of SAE features driving each unit over its top-activating tokens.

    Args:
        sae: An sae-lens SAE reading the activations ``acts`` (``[n_tokens, d_in]``).
        readers: A :class:`Readers` group, or a ``[d_in, n_units]`` matrix of read vectors.
        scale: Per-token factor the units read through (``1/σ`` of a LayerNorm; :class:`Readers`
            with a ``scale_hook`` need it).
        top: Top-activating tokens per unit: a count, or a fraction of the tokens (default: the
            top decile, so a unit that several features drive shows them all, not only the
            strongest one's peak). Only positive activations count.
        n_features: Strongest features reported per unit.
        merge: Features whose decoder directions have cosine ≥ ``merge`` count as one (SAEs often
            learn exact duplicates, which would otherwise split one feature's share in two);
            ``None`` keeps every feature separate.

    >>> scores = tlm.sae.polysemanticity(sae, acts, torch.eye(5))   # doctest: +SKIP
    """
    names = readers.names if isinstance(readers, Readers) else [f"u{i}" for i in range(readers.shape[1])]
    hook = readers.hook if isinstance(readers, Readers) else ""
    w = (readers.vectors if isinstance(readers, Readers) else readers).to(sae.W_dec.dtype)
    if isinstance(readers, Readers) and readers.scale_hook is not None and scale is None:
        raise ValueError(f"these units read through a normalization: pass scale=1/σ from {readers.scale_hook}")
    if acts.ndim != 2 or acts.shape[1] != w.shape[0] or acts.shape[1] != int(sae.cfg.d_in):
        raise ValueError(f"acts {list(acts.shape)}, readers {list(w.shape)} and the SAE's d_in {int(sae.cfg.d_in)} "
                         "must agree: acts [n_tokens, d_in], readers [d_in, n_units]")
    if acts.shape[0] == 0:
        raise ValueError("no activations: pass at least one token")
    if not torch.isfinite(acts).all():
        raise ValueError("activations contain NaN or inf")
    acts = acts.to(sae.W_dec.dtype)
    factor = torch.ones(acts.shape[0], dtype=acts.dtype) if scale is None else scale.to(acts.dtype).reshape(-1)
    unit_acts = (acts @ w) * factor[:, None]                      # [n, U]
    k = max(1, min(int(top * acts.shape[0]) if isinstance(top, float) else int(top), acts.shape[0]))
    vals, idx = unit_acts.topk(k, dim=0)                          # [k, U]
    active = vals > 0
    dw = (sae.W_dec.detach() @ w).abs()                            # [d_sae, U]: |d_f · w_u|
    # Σ_{t in top_u} factor_t |z_tf| for every unit at once: the SAE codes are sparse, so one
    # sparse [d_sae, n] × dense [n, U] product over the top-token indicator does it
    z_t = _sparse_codes(sae, acts, factor)                         # [d_sae, n] sparse
    directions = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True).clamp_min(1e-30)
    scores, tops, n_active = [], [], active.sum(0)
    chunk = max(1, int(5e7 // max(acts.shape[0], dw.shape[0])))    # bounds the [n, chunk] indicator
    for start in range(0, w.shape[1], chunk):
        sl = slice(start, start + chunk)
        indicator = torch.zeros(acts.shape[0], idx[:, sl].shape[1], dtype=acts.dtype)
        indicator.scatter_(0, idx[:, sl], active[:, sl].to(acts.dtype))
        c = (torch.sparse.mm(z_t, indicator) * dw[:, sl]).T             # [chunk, d_sae]: Σ_t |c_tf|
        if merge is not None:
            c = _merge_duplicates(c, directions, merge)
        scores.append(effective_number(c))
        share = c / c.sum(-1, keepdim=True).clamp_min(1e-30)
        sv, si = share.topk(min(n_features, share.shape[-1]), dim=-1)
        tops += [[(int(f), float(v)) for f, v in zip(fi, fv, strict=True) if v > 0]
                 for fi, fv in zip(si.tolist(), sv.tolist(), strict=True)]
    return UnitScores(hook, names, torch.cat(scores).cpu().numpy(), tops, n_active.cpu().numpy())


@torch.no_grad()
def feature_spread(sae: SAE, readers: Readers | Float[torch.Tensor, "d_in n_units"]) -> np.ndarray:
    """Effective number of units each feature reaches (its degree of superposition over units).

    Uses ``|d_f · w_u| / ‖w_u‖`` — how strongly unit u reads feature f's direction, independent of
    the unit's own scale; a feature read by one unit scores 1.
    """
    w = (readers.vectors if isinstance(readers, Readers) else readers).to(sae.W_dec.dtype)
    reach = (sae.W_dec.detach() @ (w / w.norm(dim=0, keepdim=True).clamp_min(1e-30))).abs()
    return effective_number(reach).cpu().numpy()


def _sparse_codes(sae: SAE, acts: torch.Tensor, factor: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``factor_t |z_tf|`` as a sparse ``[d_sae, n_tokens]`` matrix (encoded in token chunks)."""
    rows, cols, vals = [], [], []
    for start in range(0, acts.shape[0], chunk):
        z = sae.encode(acts[start:start + chunk]).abs() * factor[start:start + chunk, None]
        t, f = z.nonzero(as_tuple=True)
        rows.append(f)
        cols.append(t + start)
        vals.append(z[t, f])
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(index, torch.cat(vals), (int(sae.cfg.d_sae), acts.shape[0]),
                                   check_invariants=False).coalesce()   # built from valid indices; silences the warning


def _merge_duplicates(c: torch.Tensor, directions: torch.Tensor, threshold: float, support: int = 64,
                      chunk: int = 256) -> torch.Tensor:
    """Move the weight of each group of near-identical features (cosine ≥ threshold, connected
    components) onto its strongest member. Per unit, its ``support`` strongest features are compared
    (batched; the rest carry too little weight to matter)."""
    k = min(support, c.shape[1])
    out = c.clone()
    for start in range(0, c.shape[0], chunk):
        vals, idx = c[start:start + chunk].topk(k, dim=1)            # strongest first
        d = directions[idx]                                           # [u, k, d_in]
        linked = (d @ d.transpose(1, 2)) >= threshold                 # [u, k, k]
        # connected components by label propagation: each feature takes the smallest position it
        # reaches, i.e. its component's strongest member
        labels = torch.arange(k).expand(idx.shape[0], k).clone()
        for _ in range(k):
            new = torch.where(linked, labels[:, None, :], k).min(-1).values
            if torch.equal(new, labels):
                break
            labels = new
        merged = torch.zeros_like(vals).scatter_add_(1, labels, vals)
        out[start:start + chunk].scatter_(1, idx, merged)
    return out


@dataclass
class PolysemanticityTable:
    """Every unit reading one of the SAEs' hooks, scored (see :func:`score_model`)."""

    groups: list[UnitScores]
    n_tokens: int

    def ranked(self, n: int | None = None) -> list[dict[str, Any]]:
        """The most polysemantic units across all groups first."""
        rows = [r for g in self.groups for r in g.ranked()]
        rows.sort(key=lambda r: (np.isnan(r["score"]), -np.nan_to_num(r["score"])))
        return rows[:n]

    def to_markdown(self, n: int = 20) -> str:
        lines = ["| unit | hook | effective features | strongest features (share) |", "|---|---|---|---|"]
        for r in self.ranked(n):
            feats = ", ".join(f"{f} ({s:.2f})" for f, s in r["top_features"][:3])
            lines.append(f"| {r['unit']} | {r['hook']} | {r['score']:.2f} | {feats} |")
        return "\n".join(lines)


def score_model(model: Any, saes: SAESet | Sequence[SAE] | SAE, tokens: torch.Tensor, *,
                comp: Compression | None = None, attention_mask: torch.Tensor | None = None,
                max_tokens: int = 16_384, top: int | float = 0.1, batch_size: int = 32) -> PolysemanticityTable:
    """Score every neuron (and, with ``comp``, every read direction) that reads an SAE's hook.

    ``saes``: an :class:`~tl_modular.sae.SAESet`, a list of SAEs or one SAE. Activations are
    collected once over at most ``max_tokens`` valid tokens (position 0 and padding excluded).

    >>> table = tlm.sae.score_model(model, tlm.sae.bundled(model), tokens, comp=comp)   # doctest: +SKIP
    >>> print(table.to_markdown(10))                                                    # doctest: +SKIP
    """
    if hasattr(saes, "values"):
        saes = list(saes.values())
    elif not isinstance(saes, (list, tuple)):
        saes = [saes]
    plan = []
    for sae in saes:
        hook = check_fits(sae, model)
        try:
            groups = readers_for(model, hook, comp)
        except ValueError:
            continue  # an SAE no unit reads (e.g. on hook_mlp_out) has nothing to score here
        plan.append((sae, hook, groups))
    if not plan:
        raise ValueError("none of the SAEs sits where a unit reads (hook_resid_pre / hook_resid_mid / "
                         "ln*.hook_normalized); attach SAEs at the channels' inputs to score units")
    hooks = sorted({h for _, h, _ in plan} | {g.scale_hook for _, _, gs in plan for g in gs if g.scale_hook})
    acts = collect(model, tokens, hooks, attention_mask=attention_mask, batch_size=batch_size, max_tokens=max_tokens)
    out = []
    for sae, hook, groups in plan:
        for g in groups:
            scale = None if g.scale_hook is None else 1.0 / acts[g.scale_hook].reshape(-1)
            out.append(polysemanticity(sae, acts[hook], g, scale=scale, top=top))
    return PolysemanticityTable(out, int(next(iter(acts.values())).shape[0]))
