"""Verifying a pruned graph by intervention: keep only its feature nodes, ablate the rest.

Every unit's write at every position is ``μ + Σ_j a_j D_j + error`` (a write side) or
``b_dec + Σ_f a_f W_dec[f] + error`` (an SAE on an MLP's output, or a transcoder whose ``a_f``
encode the MLP's input). A run that
*keeps* a set of features leaves those ``a_j`` as the run recomputes them, holds every error
node (each ``error`` term, and the whole write of every head or MLP no unit covers) at its value
in the clean run, as circuit-tracer does (``errors="recomputed"``: as the run computes them), and
sets every other feature to its baseline: its mean over the task's clean prompts
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

from tl_modular._hooks import run_with_cache, run_with_hooks
from tl_modular._names import act_name
from tl_modular.attribution.build import _is_transcoder, _units
from tl_modular.attribution.pruning import Pruned
from tl_modular.segmentation import segment

if TYPE_CHECKING:
    from tl_modular.tasks import Task

__all__ = ["Baseline", "clean_errors", "faithfulness", "feature_masks", "random_masks", "run_with_features"]

Baseline = Literal["mean", "corrupted"]
Masks = dict[str, torch.Tensor]          # channel -> [batch, pos, rank] bool: feature kept


class _Writer:
    """A channel's write in feature coordinates: ``encode(x)`` ``[..., k]``, ``decoder`` ``[k, d_model]``
    (a write side: ``(w - μ) E`` and ``Dᵀ``; an SAE: ``relu((w - b_dec) W_enc + b_enc)`` and ``W_dec``;
    a transcoder: its encoder on the MLP's input ``x`` at :attr:`reads`, JumpReLU thresholds applied)."""

    def __init__(self, channel: Any, side: Any = None, sae: Any = None) -> None:
        self.channel, self.side, self.sae = channel, side, sae
        self.size = side.rank if side is not None else sae.cfg.d_sae
        #: the hook a transcoder encodes (the MLP's input); None: the channel's own write
        self.reads = sae.cfg.metadata.hook_name if sae is not None and _is_transcoder(sae) else None
        if self.reads is not None and "normalized" not in self.reads:
            self.reads = act_name("resid_mid", channel.layer)      # hook_mlp_in holds the same values

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        if self.side is not None:
            return (w - self.side.mean.to(w)) @ self.side.encoder.to(w)
        s = self.sae
        shift = 0.0 if self.reads is not None else s.b_dec.to(w) * float(s.cfg.apply_b_dec_to_input)
        pre = (w - shift) @ s.W_enc.to(w) + s.b_enc.to(w)
        a = pre.clamp_min(0)
        return torch.where(pre > s.threshold.to(w), a, 0.0) if hasattr(s, "threshold") else a

    def decoder(self, like: torch.Tensor) -> torch.Tensor:
        return (self.side.decoder.T if self.side is not None else self.sae.W_dec).to(like)

    def write(self, a: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """The channel's write from features ``a`` and an error term: ``μ + a Dᵀ + error`` (a side),
        ``b_dec + a W_dec + error`` (an SAE or transcoder)."""
        offset = self.side.mean if self.side is not None else self.sae.b_dec
        return offset.to(error) + a.to(error) @ self.decoder(error) + error


def _writers(model: Any, units: Any) -> list[_Writer]:
    comp, saes = _units(model, units)
    out = []
    for c in segment(model):
        if c.kind not in ("head", "mlp"):
            continue
        if c.name in saes:
            out.append(_Writer(c, sae=saes[c.name]))
        elif comp is not None and c.name in comp:
            out.append(_Writer(c, side=comp[c.name].write))
    return out


def feature_masks(model: Any, kept: Sequence[Pruned], units: Any, *, every_node: bool = False) -> Masks:
    """``{channel: [batch, pos, features]}`` masks of the kept feature nodes (with ``every_node``: of
    every feature node of the graphs), one row per pruned graph (``units`` as given to
    :func:`~tl_modular.attribution_graph`)."""
    if not kept:
        raise ValueError("kept must hold one Pruned graph per prompt, got none")
    n_pos = len(kept[0].graph.tokens)
    masks = {w.channel.name: torch.zeros(len(kept), n_pos, w.size, dtype=torch.bool) for w in _writers(model, units)}
    for row, pr in enumerate(kept):
        for node, keep in zip(pr.graph.nodes, pr.nodes.tolist(), strict=True):
            if (keep or every_node) and node.kind == "feature":
                if node.channel not in masks:
                    raise ValueError(f"the graph's feature {node.name} belongs to no unit of units: pass the units "
                                     "the graphs were built with")
                masks[node.channel][row, node.position, node.index] = True
    return masks


def random_masks(masks: Masks, generator: torch.Generator, candidates: Masks | None = None) -> Masks:
    """Random masks keeping as many features per prompt as ``masks`` does, drawn uniformly among the
    ``candidates`` (all entries by default)."""
    names = list(masks)
    cand = candidates if candidates is not None else {n: torch.ones_like(m) for n, m in masks.items()}
    out = {n: torch.zeros_like(m) for n, m in masks.items()}
    for row in range(next(iter(masks.values())).shape[0]):
        count = sum(int((masks[n][row] & cand[n][row]).sum()) for n in names)
        flat = torch.cat([cand[n][row].reshape(-1) for n in names])
        pick = flat.nonzero()[:, 0]
        chosen = torch.zeros_like(flat)
        chosen[pick[torch.randperm(pick.numel(), generator=generator)[:count]]] = True
        start = 0
        for n in names:
            size = cand[n][row].numel()
            out[n][row] = chosen[start:start + size].reshape(out[n][row].shape)
            start += size
    return out


@torch.no_grad()
def _activations(model: Any, writers: Sequence[_Writer], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each unit's write in feature coordinates: ``[batch, pos, features]``."""
    names = {act_name("z", w.channel.layer) if w.channel.kind == "head"
             else w.reads or act_name("mlp_out", w.channel.layer) for w in writers}
    _, cache = run_with_cache(model, tokens.to(model.cfg.device), names_filter=lambda n: n in names)
    out = {}
    for wr in writers:
        c = wr.channel
        if c.kind == "head":
            w = cache[act_name("z", c.layer)][:, :, c.head] @ model.blocks[c.layer].attn.W_O[c.head]
        else:
            w = cache[wr.reads or act_name("mlp_out", c.layer)]
        out[c.name] = wr.encode(w)
    return out


def _baseline(model: Any, writers: Sequence[_Writer], task: Task, baseline: Baseline) -> dict[str, torch.Tensor]:
    if baseline == "corrupted":
        return _activations(model, writers, task.corrupted)
    if baseline == "mean":
        acts = _activations(model, writers, task.clean)
        return {n: a[:, 1:].mean((0, 1))[None, None].expand_as(a) for n, a in acts.items()}
    raise ValueError(f"baseline must be 'mean' or 'corrupted', got {baseline!r}")


def _head_write(model: Any, z: torch.Tensor, c: Any) -> torch.Tensor:
    """Head ``c``'s write (without ``b_O``, the bias channel's) from the layer's ``z``."""
    return z[:, :, c.head] @ model.blocks[c.layer].attn.W_O[c.head]


@torch.no_grad()
def clean_errors(model: Any, units: Any, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every head's and MLP's error node values in the run on ``tokens``: ``{channel: [batch, pos,
    d_model]}``, the write minus what its unit reconstructs (``w - μ - a Dᵀ``, ``w - b_dec - a
    W_dec``), or the whole write of a channel no unit covers (an error node of its own)."""
    given = isinstance(units, list) and units and all(isinstance(w, _Writer) for w in units)
    writers = {w.channel.name: w for w in (units if given else _writers(model, units))}
    names = {act_name("z", c.layer) if c.kind == "head" else act_name("mlp_out", c.layer) for c in _mixers(model)}
    names |= {w.reads for w in writers.values() if w.reads is not None}
    _, cache = run_with_cache(model, tokens.to(model.cfg.device), names_filter=lambda n: n in names)
    out = {}
    for c in _mixers(model):
        w = (_head_write(model, cache[act_name("z", c.layer)], c) if c.kind == "head"
             else cache[act_name("mlp_out", c.layer)])
        wr = writers.get(c.name)
        out[c.name] = w if wr is None else w - wr.write(wr.encode(cache[wr.reads] if wr.reads is not None else w),
                                                        torch.zeros_like(w))
    return out


def _mixers(model: Any) -> list[Any]:
    return [c for c in segment(model) if c.kind in ("head", "mlp")]


def run_with_features(model: Any, units: Any, tokens: torch.Tensor, masks: Mapping[str, torch.Tensor],
                      base: Mapping[str, torch.Tensor], *, errors: Mapping[str, torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """Logits of ``model`` on ``tokens`` with every unit's unmasked write features set to ``base``
    (``[batch, pos, features]``) and the masked ones left as computed.

    ``errors`` (from :func:`clean_errors`) holds the error nodes at those values: each covered
    channel writes what its unit reconstructs from the features plus ``errors[channel]``, and every
    other head and MLP writes ``errors[channel]`` (its whole write). ``None``: the error terms are
    what the run computes (the channel's write minus its unit's reconstruction)."""
    given = isinstance(units, list) and units and all(isinstance(w, _Writer) for w in units)
    writers = units if given else _writers(model, units)
    for wr in writers:
        c = wr.channel
        want = (tokens.shape[0], tokens.shape[1], wr.size)
        for label, given in (("masks", masks), ("base", base)):
            if c.name not in given or tuple(given[c.name].shape) != want:
                got = tuple(given[c.name].shape) if c.name in given else "nothing"
                raise ValueError(f"{label}[{c.name!r}] must be [batch, pos, features] = {want} for these tokens and "
                                 f"units, got {got}")
    mixers = _mixers(model)
    if errors is not None:
        want = (tokens.shape[0], tokens.shape[1], model.cfg.d_model)
        bad = [c.name for c in mixers if c.name not in errors or tuple(errors[c.name].shape) != want]
        if bad:
            raise ValueError(f"errors must hold every head's and MLP's error term, [batch, pos, d_model] = {want} "
                             f"(clean_errors(model, units, tokens)); {bad[0]!r} is missing or of another shape")
    by_name = {wr.channel.name: wr for wr in writers}
    z_store: dict[int, torch.Tensor] = {}
    in_store: dict[str, torch.Tensor] = {}        # transcoders' inputs, by hook
    hooks = []

    def save_z(z: torch.Tensor, hook: Any) -> None:
        z_store[hook.layer()] = z

    def save_input(x: torch.Tensor, hook: Any) -> None:
        in_store[hook.name] = x

    def edit(out: torch.Tensor, hook: Any, kind: str) -> torch.Tensor:
        layer = hook.layer()
        delta = torch.zeros_like(out)
        for c in mixers:
            wr = by_name.get(c.name)
            if c.layer != layer or c.kind != kind or (wr is None and errors is None):
                continue
            w = _head_write(model, z_store[layer], c) if kind == "head" else out
            if wr is None:                            # an error node of its own: its clean write
                delta = delta + errors[c.name].to(w) - w
                continue
            cur = wr.encode(in_store[wr.reads] if wr.reads is not None else w)
            new = torch.where(masks[c.name].to(cur.device), cur, base[c.name].to(cur))
            delta = delta + ((new - cur) @ wr.decoder(w) if errors is None else wr.write(new, errors[c.name].to(w)) - w)
        return out + delta

    hooks += [(h, save_input) for h in sorted({wr.reads for wr in writers if wr.reads is not None})]
    for layer in range(model.cfg.n_layers):
        hooks.append((act_name("z", layer), save_z))
        hooks.append((act_name("attn_out", layer), lambda o, hook: edit(o, hook, "head")))
        hooks.append((act_name("mlp_out", layer), lambda o, hook: edit(o, hook, "mlp")))
    return run_with_hooks(model, tokens.to(model.cfg.device), fwd_hooks=hooks)


@torch.no_grad()
def faithfulness(model: Any, task: Task, units: Any, kept: Sequence[Pruned] | Masks, *,
                 baseline: Baseline = "mean", inactive: Literal["keep", "ablate"] = "keep",
                 errors: Literal["frozen", "recomputed"] = "frozen", n_random: int = 0,
                 seed: int = 0) -> dict[str, Any]:
    """Metric recovered by keeping only ``kept``'s features (one pruned graph per prompt of ``task``).

    Args:
        errors: The error nodes (what each unit does not reconstruct, and every head or MLP no
            unit covers) hold their values in the clean run (``"frozen"``, as circuit-tracer
            does: the graph with all its features kept scores 1), or are what the intervened run
            computes (``"recomputed"``: a channel's write minus its unit's reconstruction, so
            uncovered channels and the residuals respond to the ablation too).
        inactive: SAE features inactive on a prompt (no nodes of its graph) are left as computed
            (``"keep"``) or set to the baseline with the other ablated features (``"ablate"``).
            Write directions are nodes at every position, so this matters for SAE units only.

    Returns:
        ``{"faithfulness", "clean", "ablated", "n_features", "random"}``: the metric means
        and, with ``n_random``, the faithfulness of random feature sets of the same sizes.
    """
    if inactive not in ("keep", "ablate"):
        raise ValueError(f"inactive must be 'keep' or 'ablate', got {inactive!r}")
    if errors not in ("frozen", "recomputed"):
        raise ValueError(f"errors must be 'frozen' or 'recomputed', got {errors!r}")
    writers = _writers(model, units)
    masks = kept if isinstance(kept, Mapping) else feature_masks(model, kept, units)
    rows = next(iter(masks.values())).shape[0]
    if rows != len(task):
        raise ValueError(f"kept has {rows} prompts, the task {len(task)}; build one graph per prompt of the task")
    base = _baseline(model, writers, task, baseline)
    held = clean_errors(model, writers, task.clean) if errors == "frozen" else None
    # SAE features inactive on a prompt are no nodes of its graph: "keep" leaves them as the run
    # computes them (only graph nodes are ablated), "ablate" sets them to the baseline too
    if isinstance(kept, Mapping) or inactive == "ablate":
        nodes = {n: torch.ones_like(m) for n, m in masks.items()}
    else:
        nodes = feature_masks(model, kept, units, every_node=True)
    outside = {n: ~m for n, m in nodes.items()}
    masks = {n: m | outside[n] for n, m in masks.items()}
    none = dict(outside)

    def metric(m: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return task.metric(run_with_features(model, writers, task.clean, m, base, errors=held),
                           per_example=True).double().cpu()

    clean = task.metric(model(task.clean.to(model.cfg.device)), per_example=True).double().cpu()
    ablated = metric(none)
    den = float((clean - ablated).sum())

    def ratio(m: Mapping[str, torch.Tensor]) -> float:
        return float((metric(m) - ablated).sum()) / den if den else float("nan")

    gen = torch.Generator().manual_seed(seed)
    return {"faithfulness": ratio(masks), "clean": float(clean.mean()), "ablated": float(ablated.mean()),
            "n_features": int(sum(int((m & nodes[n]).sum()) for n, m in masks.items())),
            "random": [ratio({n: m | outside[n] for n, m in random_masks(masks, gen, nodes).items()})
                       for _ in range(n_random)]}
