"""Verifying a pruned graph by intervention: keep only its feature nodes, ablate the rest.

Every compressed channel's write at every position is ``μ + Σ_j a_j D_j + error``. A run that
*keeps* a set of features leaves those ``a_j`` (recomputed in the run) and every error term as
they are, and sets every other feature to its baseline: its mean over the task's clean prompts
(positions ≥ 1; ``baseline="mean"``) or its value in the corrupted prompt (``"corrupted"``).
Faithfulness is ``Σ(m_kept - m_ablated) / Σ(m_clean - m_ablated)`` over the prompts, the
metric being the task's own (as in :mod:`tl_modular.circuits`). Hooks are TransformerLens
hooks added for one forward pass and removed after it, also on error.

>>> f = tlm.attribution.faithfulness(model, task, comp, kept)      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from tl_modular._names import act_name
from tl_modular.attribution.pruning import Pruned
from tl_modular.segmentation import segment

if TYPE_CHECKING:
    from tl_modular.compression import Compression
    from tl_modular.tasks import Task

__all__ = ["Baseline", "faithfulness", "feature_masks", "random_masks", "run_with_features"]

Baseline = Literal["mean", "corrupted"]
Masks = dict[str, torch.Tensor]          # channel -> [batch, pos, rank] bool: feature kept


def _heads_and_mlps(model: Any, units: Compression) -> list[Any]:
    return [c for c in segment(model) if c.kind in ("head", "mlp") and c.name in units]


def feature_masks(kept: Sequence[Pruned], units: Compression) -> Masks:
    """``{channel: [batch, pos, rank]}`` masks of the kept feature nodes, one row per pruned graph."""
    if not kept:
        raise ValueError("kept must hold one Pruned graph per prompt, got none")
    n_pos = len(kept[0].graph.tokens)
    masks = {name: torch.zeros(len(kept), n_pos, units[name].write.rank, dtype=torch.bool) for name in units}
    for row, pr in enumerate(kept):
        for node, keep in zip(pr.graph.nodes, pr.nodes.tolist(), strict=True):
            if keep and node.kind == "feature":
                masks[node.channel][row, node.position, node.index] = True
    return masks


def random_masks(masks: Masks, generator: torch.Generator) -> Masks:
    """Random masks keeping as many features per prompt as ``masks`` does (positions ≥ 1 and all
    directions drawn uniformly)."""
    names = list(masks)
    out = {n: torch.zeros_like(m) for n, m in masks.items()}
    sizes = [m[0].numel() for m in masks.values()]
    for row in range(next(iter(masks.values())).shape[0]):
        count = sum(int(m[row].sum()) for m in masks.values())
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=generator)[:count]] = True
        start = 0
        for n, s in zip(names, sizes, strict=True):
            out[n][row] = flat[start:start + s].reshape(out[n][row].shape)
            start += s
    return out


@torch.no_grad()
def _activations(model: Any, units: Compression, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each compressed channel's write coordinates ``(w - μ) E``: ``[batch, pos, rank]``."""
    channels = [c for c in _heads_and_mlps(model, units)]
    names = {act_name("z", c.layer) if c.kind == "head" else act_name("mlp_out", c.layer) for c in channels}
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n in names)
    out = {}
    for c in channels:
        side = units[c.name].write
        if c.kind == "head":
            w = cache[act_name("z", c.layer)][:, :, c.head] @ model.blocks[c.layer].attn.W_O[c.head]
        else:
            w = cache[act_name("mlp_out", c.layer)]
        out[c.name] = (w - side.mean.to(w)) @ side.encoder.to(w)
    return out


def _baseline(model: Any, units: Compression, task: Task, baseline: Baseline) -> dict[str, torch.Tensor]:
    if baseline == "corrupted":
        return _activations(model, units, task.corrupted)
    if baseline == "mean":
        acts = _activations(model, units, task.clean)
        return {n: a[:, 1:].mean((0, 1))[None, None].expand_as(a) for n, a in acts.items()}
    raise ValueError(f"baseline must be 'mean' or 'corrupted', got {baseline!r}")


def run_with_features(model: Any, units: Compression, tokens: torch.Tensor, masks: Mapping[str, torch.Tensor],
                      base: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` on ``tokens`` with every compressed channel's unmasked write features set
    to ``base`` (``[batch, pos, rank]``) and the masked ones (and the error terms) left as computed."""
    channels = _heads_and_mlps(model, units)
    for c in channels:
        want = (tokens.shape[0], tokens.shape[1], units[c.name].write.rank)
        for label, given in (("masks", masks), ("base", base)):
            if c.name not in given or tuple(given[c.name].shape) != want:
                got = tuple(given[c.name].shape) if c.name in given else "nothing"
                raise ValueError(f"{label}[{c.name!r}] must be [batch, pos, rank] = {want} for these tokens and "
                                 f"units, got {got}")
    z_store: dict[int, torch.Tensor] = {}
    hooks = []

    def save_z(z: torch.Tensor, hook: Any) -> None:
        z_store[hook.layer()] = z

    def edit(out: torch.Tensor, hook: Any, kind: str) -> torch.Tensor:
        layer = hook.layer()
        delta = torch.zeros_like(out)
        for c in channels:
            if c.layer != layer or c.kind != kind:
                continue
            side = units[c.name].write
            if kind == "head":
                w = z_store[layer][:, :, c.head] @ model.blocks[layer].attn.W_O[c.head]
            else:
                w = out
            cur = (w - side.mean.to(w)) @ side.encoder.to(w)
            keep = masks[c.name].to(cur.device)
            new = torch.where(keep, cur, base[c.name].to(cur))
            delta = delta + (new - cur) @ side.decoder.to(w).T
        return out + delta

    for layer in range(model.cfg.n_layers):
        hooks.append((act_name("z", layer), save_z))
        hooks.append((act_name("attn_out", layer), lambda o, hook: edit(o, hook, "head")))
        hooks.append((act_name("mlp_out", layer), lambda o, hook: edit(o, hook, "mlp")))
    return model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=hooks)


@torch.no_grad()
def faithfulness(model: Any, task: Task, units: Compression, kept: Sequence[Pruned] | Masks, *,
                 baseline: Baseline = "mean", n_random: int = 0, seed: int = 0) -> dict[str, Any]:
    """Metric recovered by keeping only ``kept``'s features (one pruned graph per prompt of ``task``).

    Returns:
        ``{"faithfulness", "clean", "ablated", "kept", "n_features", "random"}``: the metric means
        and, with ``n_random``, the faithfulness of random feature sets of the same sizes.
    """
    masks = kept if isinstance(kept, Mapping) else feature_masks(kept, units)
    rows = next(iter(masks.values())).shape[0]
    if rows != len(task):
        raise ValueError(f"kept has {rows} prompts, the task {len(task)}; build one graph per prompt of the task")
    base = _baseline(model, units, task, baseline)
    none = {n: torch.zeros_like(m) for n, m in masks.items()}

    def metric(m: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return task.metric(run_with_features(model, units, task.clean, m, base), per_example=True).double().cpu()

    clean = task.metric(model(task.clean.to(model.cfg.device)), per_example=True).double().cpu()
    ablated = metric(none)
    den = float((clean - ablated).sum())

    def ratio(m: Mapping[str, torch.Tensor]) -> float:
        return float((metric(m) - ablated).sum()) / den if den else float("nan")

    gen = torch.Generator().manual_seed(seed)
    return {"faithfulness": ratio(masks), "clean": float(clean.mean()), "ablated": float(ablated.mean()),
            "n_features": int(sum(int(m.sum()) for m in masks.values())),
            "random": [ratio(random_masks(masks, gen)) for _ in range(n_random)]}
