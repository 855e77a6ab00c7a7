"""Per-prompt attribution graphs over a compression's write directions, error, embedding and bias
nodes, ending in a logit node.

The model is linearised at the clean run: attention patterns, every normalisation scale ``σ``
and every MLP's activation gate ``g = act(pre) / pre`` are frozen. The frozen model is affine
in the residual stream, so each *target* node's value is exactly the sum of its incoming edges
plus a constant (``bias``: normalisation offsets, ``b_V``, ``b_in``, minus the side's mean):

- **feature** ``{channel}:write.d{j}@p`` — the channel's write at position ``p`` on write
  direction ``j`` of its :class:`~tl_modular.Side`: ``a_j = (w_c(p) - μ) E_j``; it writes
  ``a_j D_j`` into the residual stream. Features are targets and sources.
- **error** ``{channel}:error@p`` — what the side does not reconstruct, ``w_c - μ - a Dᵀ``
  (or the whole write of a channel that ``units`` does not cover). Source only.
- **embed** ``embed@p`` (and ``pos_embed@p``) — source only.
- **bias** ``bias:{stream}@p`` — constant writes (the sides' means ``μ``, ``b_O``) at one
  point of the stream. Source only.
- **logit** — the target metric: mean over scored positions of ``logit[answer] -
  logit[wrong]`` (or ``logit[answer]``). Target only.

An edge ``s → t`` is the direct effect through the residual stream: ``write_s · ∂t/∂resid``
in the frozen model (for heads, through the frozen pattern from ``p'`` to ``p``), i.e.
activation × virtual weight as in transcoder attribution graphs.

>>> comp = tlm.compress(model, task.clean)                               # doctest: +SKIP
>>> g = tlm.attribution_graph(model, task[0], units=comp)[0]             # doctest: +SKIP
>>> g.completeness()                                                     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tl_modular._hooks import run_with_cache
from tl_modular._models import check_supported
from tl_modular._names import act_name, hook_layer, mlp_name
from tl_modular.attribution.graph import AttributionGraph, Node
from tl_modular.segmentation import ChannelSet, segment

if TYPE_CHECKING:
    from tl_modular.compression import Compression

__all__ = ["GraphSize", "GraphTooLargeError", "attribution_graph", "graph_size", "unsupported"]

#: Peak bytes per edge a build holds: the emitted ``(target, source, weight)`` blocks (24 bytes), their
#: concatenation and the coalesced sparse matrix (24 each), the sort's temporaries and the allocator's
#: slack (measured: 103 bytes per edge, a build of the bundled text model holding 12.2M edges, before
#: pruned builds folded their dropped features as they go; a pruned build holds only its graph's edges).
EDGE_BYTES = 128


class GraphTooLargeError(RuntimeError):
    """A build stopped at ``max_edges`` (before holding more): raise ``min_influence`` or give it more."""

    def __init__(self, edges: int, max_edges: int) -> None:
        super().__init__(f"the attribution graph passed max_edges={max_edges:,} edges ({edges:,} held so far): "
                         "raise min_influence (a sparser pruned build) or max_edges")
        self.edges, self.max_edges = edges, max_edges


@dataclass(frozen=True)
class GraphSize:
    """Size of one prompt's full graph (an upper bound: zero edges are dropped, and SAE or transcoder
    units count every feature as active) and the bytes a build holds at its peak."""

    nodes: int
    edges: int
    d_model: int

    @property
    def node_bytes(self) -> int:
        """The nodes' writes ``[nodes, d_model]`` in float64, held three times (the sources' writes,
        the graph's copy and the frozen-LayerNorm inputs of one layer)."""
        return 3 * 8 * self.nodes * self.d_model

    @property
    def bytes(self) -> int:
        return self.node_bytes + EDGE_BYTES * self.edges


def graph_size(model: Any, units: Any, n_pos: int, n_targets: int = 1) -> GraphSize:
    """The size of :func:`attribution_graph`'s full graph of one ``n_pos``-token prompt whose logit
    node reads ``n_targets`` positions, from the units' ranks alone (nothing is run): a head's
    feature at position ``p`` reads every node up to its layer at positions ``<= p``, an MLP's
    every node up to its attention at ``p``, the logit every node at its positions. A pruned build
    (``min_influence``) holds the same nodes and at most these edges.

    Raises:
        TypeError / ValueError: what :func:`attribution_graph` raises for the model or units;
            ``n_pos`` or ``n_targets`` below 1.
    """
    channels, comp, saes = _check(model, units)
    if n_pos < 1 or n_targets < 1:
        raise ValueError(f"n_pos and n_targets must be >= 1, got {n_pos} and {n_targets}")
    cfg = model.cfg
    upto = 1 + int(cfg.positional_embedding_type == "standard")      # nodes per position at streams <= s
    edges = 0
    for layer in range(cfg.n_layers):
        heads = [c for c in channels.in_layer(layer) if c.kind == "head"]
        ranks = [comp[c.name].write.rank if comp is not None and c.name in comp else 0 for c in heads]
        edges += sum(ranks) * upto * n_pos * (n_pos + 1) // 2        # through the causal pattern
        upto += sum(ranks) + len(heads) + 1                            # features, errors, the bias node
        name = mlp_name(layer)
        rank = (int(saes[name].cfg.d_sae) if name in saes
                else comp[name].write.rank if comp is not None and name in comp else 0)
        edges += rank * upto * n_pos
        upto += rank + 2                                               # features, error, bias node
    edges += upto * n_targets
    return GraphSize(nodes=upto * n_pos + 1, edges=int(edges), d_model=int(cfg.d_model))


def _is_sae(x: Any) -> bool:
    return hasattr(x, "W_enc") and hasattr(x, "W_dec") and hasattr(x, "cfg")


def _is_transcoder(x: Any) -> bool:
    return getattr(x.cfg, "d_out", None) is not None


_TRANSCODER_ARCHS = ("transcoder", "jumprelu_transcoder")


def _transcoder_layer(model: Any, tc: Any) -> int:
    """The MLP layer a transcoder replaces; ``ValueError`` for one this graph cannot take."""
    arch = tc.cfg.architecture() if callable(getattr(tc.cfg, "architecture", None)) else None
    hook_in = tc.cfg.metadata.hook_name
    hook_out = getattr(tc.cfg.metadata, "hook_name_out", None)
    if arch not in _TRANSCODER_ARCHS or hasattr(tc, "W_skip"):
        raise ValueError(f"the transcoder on {hook_in!r} is {arch!r}; only sae-lens Transcoder and "
                         "JumpReLUTranscoder (no skip connection) are supported as graph nodes")
    if getattr(tc.cfg, "normalize_activations", "none") != "none":
        raise ValueError(f"the transcoder on {hook_in!r} has normalize_activations="
                         f"{tc.cfg.normalize_activations!r}; only 'none' is supported (fold the scales first)")
    layer = hook_layer(hook_out) if isinstance(hook_out, str) else None
    if layer is None or layer >= model.cfg.n_layers or hook_out != act_name("mlp_out", layer):
        raise ValueError(f"a transcoder node must write an MLP's output (cfg.metadata.hook_name_out = "
                         f"'blocks.<layer>.hook_mlp_out'), got {hook_out!r}")
    ins = (act_name("normalized", layer, "ln2"), act_name("resid_mid", layer), act_name("mlp_in", layer))
    if hook_in not in ins or (hook_in == ins[0] and model.cfg.normalization_type is None):
        raise ValueError(f"the transcoder writing {hook_out!r} must read that MLP's input ({ins[0]!r}, or "
                         f"{ins[1]!r} / {ins[2]!r}), got {hook_in!r}")
    if int(tc.cfg.d_in) != model.cfg.d_model or int(tc.cfg.d_out) != model.cfg.d_model:
        raise ValueError(f"the transcoder on {hook_in!r} is {tc.cfg.d_in} -> {tc.cfg.d_out} wide, the model's "
                         f"d_model is {model.cfg.d_model}: it was trained on another model")
    return layer


def _units(model: Any, units: Any) -> tuple[Any, dict[str, Any]]:
    """``(compression or None, {MLP channel: SAE or transcoder})`` from what ``units`` holds."""
    from tl_modular.compression import Compression

    items = list(units) if isinstance(units, (list, tuple)) else [units]
    comp, saes = None, {}
    for item in items:
        if isinstance(item, Compression):
            if comp is not None:
                raise ValueError("units holds two Compressions; pass one")
            item.check_model(model)
            comp = item
        elif isinstance(item, Mapping) and item and all(_is_sae(v) for v in item.values()):
            items.extend(item.values())
        elif _is_sae(item) and _is_transcoder(item):
            name = mlp_name(_transcoder_layer(model, item))
            if name in saes:
                raise ValueError(f"units holds two SAEs or transcoders on {name}; pass one per MLP")
            saes[name] = item
        elif _is_sae(item):
            hook = item.cfg.metadata.hook_name
            layer = hook_layer(hook) if isinstance(hook, str) else None
            if layer is None or hook != act_name("mlp_out", layer) or layer >= model.cfg.n_layers:
                raise ValueError(f"SAE units must read an MLP's output (blocks.<layer>.hook_mlp_out), got one on "
                                 f"{hook!r}; residual-stream SAEs are not nodes of this graph (filter them out: "
                                 "[s for h, s in saes.items() if h.endswith('hook_mlp_out')])")
            arch = item.cfg.architecture() if callable(getattr(item.cfg, "architecture", None)) else None
            if arch != "standard" or getattr(item.cfg, "normalize_activations", "none") != "none":
                raise ValueError(f"the SAE on {hook!r} is {arch!r} with normalize_activations="
                                 f"{getattr(item.cfg, 'normalize_activations', None)!r}; only standard (ReLU) SAEs "
                                 "without input normalisation are supported")
            name = mlp_name(layer)
            if name in saes:
                raise ValueError(f"units holds two SAEs on {hook!r} (or an SAE and a transcoder on {name}); pass "
                                 "one per MLP")
            saes[name] = item
        else:
            raise TypeError(f"units must be a tlm.Compression (from tlm.compress(model, tokens)), an sae-lens SAE on "
                            f"an MLP's output or a Transcoder / JumpReLUTranscoder replacing an MLP, a mapping of "
                            f"them (tlm.sae.bundled()) or a list of these; got {type(item).__name__}")
    return comp, saes


def _check(model: Any, units: Any) -> tuple[ChannelSet, Any, dict[str, Any]]:
    if not hasattr(model, "cfg") or not hasattr(model, "run_with_cache"):
        raise TypeError(f"model must be a TransformerLens HookedTransformer, got {type(model).__name__}")
    check_supported(model)
    comp, saes = _units(model, units)
    cfg = model.cfg
    if cfg.normalization_type not in ("LN", "LNPre", None):
        raise ValueError(f"attribution graphs support LayerNorm models (normalization_type 'LN'/'LNPre'), "
                         f"got {cfg.normalization_type!r}")
    if getattr(cfg, "attn_only", False) or getattr(cfg, "gated_mlp", False) or getattr(cfg, "parallel_attn_mlp", False):
        raise ValueError("attribution graphs support standard sequential attention + MLP blocks only "
                         "(no attn_only, gated or parallel MLPs)")
    if cfg.positional_embedding_type == "shortformer":
        raise ValueError("shortformer positional embeddings (read only by q/k) are not supported")
    if cfg.act_fn not in ("gelu", "gelu_new", "relu", "silu", "gelu_fast", "gelu_pytorch_tanh"):
        raise ValueError(f"the MLP activation must be elementwise (gelu, relu, silu), got {cfg.act_fn!r}")
    return segment(model), comp, saes


def unsupported(model: Any, units: Any) -> str | None:
    """Why :func:`attribution_graph` cannot build graphs of ``model`` over ``units``, or ``None`` when
    it can (the same checks it runs, so callers such as the report follow what it supports)."""
    try:
        _check(model, units)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _targets(target: Any, n_pos: int, d_vocab: int) -> dict[str, list[int]]:
    if not isinstance(target, dict) or not {"positions", "answers"} <= set(target):
        raise ValueError("target must be a dict with 'positions' and 'answers' (and optionally "
                         f"'wrong_answers'), or pass a tlm.Task; got {target!r}")
    out = {k: [int(x) for x in torch.as_tensor(v).reshape(-1).tolist()] for k, v in target.items()
           if v is not None and k in ("positions", "answers", "wrong_answers")}
    if not out["positions"] or len(out["answers"]) != len(out["positions"]) or (
            "wrong_answers" in out and len(out["wrong_answers"]) != len(out["positions"])):
        raise ValueError(f"target: positions, answers (and wrong_answers) must be non-empty and of equal "
                         f"length, got {out}")
    if min(out["positions"]) < 0 or max(out["positions"]) >= n_pos:
        raise ValueError(f"target positions must lie in [0, {n_pos}), got {out['positions']}")
    for k in ("answers", "wrong_answers"):
        if k in out and (min(out[k]) < 0 or max(out[k]) >= d_vocab):
            raise ValueError(f"target {k} must be token ids in [0, {d_vocab}), got {out[k]}")
    return out


def attribution_graph(model: Any, tokens: Any, units: Any, *, target: dict[str, Any] | None = None,
                      dtype: torch.dtype = torch.float64, min_influence: float | None = None,
                      max_edges: int | None = None) -> AttributionGraph | list[AttributionGraph]:
    """Attribution graph(s) of ``model`` on ``tokens`` over the write directions of ``units``.

    Args:
        model: A ``HookedTransformer`` with LayerNorm and elementwise MLPs (the model is only run
            with a cache; no hook stays on it).
        tokens: ``[pos]`` or ``[1, pos]`` token ids (one graph), ``[batch, pos]`` (a list, row by
            row), or a :class:`~tl_modular.Task` (one graph per prompt, its target from the task).
        units: A :class:`~tl_modular.Compression` (each compressed channel's write side gives one
            feature node per direction kept, ``side.rank``, and position), standard sae-lens SAEs
            on MLP outputs (``blocks.{l}.hook_mlp_out``: one node per feature active at a position;
            they take the place of that MLP's write side), sae-lens ``Transcoder`` /
            ``JumpReLUTranscoder`` objects reading an MLP's input (``blocks.{l}.ln2.hook_normalized``,
            ``hook_resid_mid`` or ``hook_mlp_in``) and writing its output (``hook_mlp_out``): one
            node per active feature replacing that MLP, as in circuit-tracer, the MLP's error node
            its true output minus the transcoder's; a mapping of them (``tlm.sae.bundled()``
            filtered to ``hook_mlp_out``) or a list of these. Channels covered by none become
            error nodes.
        target: With plain tokens: ``{"positions": [...], "answers": [...], "wrong_answers":
            [...]}`` (wrong answers optional; the logit node is the mean over the positions of
            the logit, or logit difference).
        dtype: Arithmetic precision (float64 by default, so completeness holds to ~1e-12 on a
            float64 model and to fp32 rounding on a float32 one).
        min_influence: Prune while building: targets are visited from the logit backwards and a
            feature whose influence on the logit (:func:`~tl_modular.attribution.influence` over
            the edges found so far) is below this gets no incoming edges; it is folded into its
            channel's error node at its position (its write and outgoing edges move there), so
            completeness still holds. Every other edge equals the full build's bit for bit; an
            error node's out-edges are sums (to ~1e-13 relative of a sum in another order). Built
            in two passes (the first decides the kept features holding no edge, the second
            computes their edges with the dropped features' merged as they come), so a build
            holds no more edges than its pruned graph. ``info["dropped_features"]`` counts the
            folded features. ``None``: the full graph.
        max_edges: Stop a build (of any one prompt) with :class:`GraphTooLargeError` once it
            holds more edges than this (``info["edges_built"]``: a pruned build's after its
            dropped features' edges merged, i.e. its graph's edges), before holding them
            (:func:`graph_size` estimates a full build's edges beforehand). ``None``: no limit.

    Returns:
        One :class:`AttributionGraph` for ``[pos]`` or ``[1, pos]`` tokens, else a list of them
        (always a list for a Task).

    Raises:
        TypeError / ValueError: an unsupported model, ``units`` not a Compression, a missing or
            malformed target, tokens of the wrong shape, an SAE or transcoder the graph cannot
            take (wrong hooks, skip connections, input normalisation), ``min_influence`` < 0,
            ``max_edges`` < 1.
        GraphTooLargeError: a build passed ``max_edges``.

    >>> g = tlm.attribution_graph(model, task[0], units=comp)[0]        # doctest: +SKIP
    >>> g.completeness() < 1e-5                                          # doctest: +SKIP
    True
    """

    from tl_modular.tasks import Task  # tasks is a lazily loaded package

    channels, comp, saes = _check(model, units)
    if min_influence is not None and (isinstance(min_influence, bool) or not isinstance(min_influence, (int, float))
                                      or not min_influence >= 0):
        raise ValueError(f"min_influence must be a number >= 0 (or None for the full graph), got {min_influence!r}")
    if max_edges is not None and (isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 1):
        raise ValueError(f"max_edges must be an int >= 1 (or None for no limit), got {max_edges!r}")
    if isinstance(tokens, Task):
        task = tokens
        rows = [(task.clean[i], {"positions": task.positions[i], "answers": task.answers[i],
                                 "wrong_answers": None if task.wrong_answers is None or task.metric_kind != "logit_diff"
                                 else task.wrong_answers[i]}) for i in range(len(task))]
        graphs = [_one(model, channels, comp, saes, t, _targets(tg, len(t), model.cfg.d_vocab), dtype,
                       min_influence, max_edges)
                  for t, tg in rows]
        return graphs
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int, torch.int32) or not (
            tokens.ndim == 1 or tokens.ndim == 2) or tokens.shape[-1] == 0:
        raise TypeError(f"tokens must be a non-empty integer tensor [pos] or [batch, pos] or a tlm.Task, got "
                        f"{type(tokens).__name__} {getattr(tokens, 'shape', '')}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab:
        raise ValueError(f"tokens must be ids in [0, {model.cfg.d_vocab}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    if tokens.shape[-1] > model.cfg.n_ctx:
        raise ValueError(f"tokens have {tokens.shape[-1]} positions, the model's context is {model.cfg.n_ctx}")
    if target is None:
        raise ValueError("target is required with plain tokens: pass target={'positions': [p], 'answers': [tok], "
                         "'wrong_answers': [tok]} or pass a tlm.Task instead of tokens")
    rows = tokens[None] if tokens.ndim == 1 else tokens
    tg = _targets(target, rows.shape[1], model.cfg.d_vocab)
    graphs = [_one(model, channels, comp, saes, row, tg, dtype, min_influence, max_edges) for row in rows]
    return graphs[0] if tokens.ndim == 1 or len(rows) == 1 else graphs


def _ln(model: Any, scale_hook: str, cache: Any, row: int, dtype: torch.dtype
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Frozen normalisation ``x ↦ (P x) w / σ + b`` of the norm owning ``scale_hook``:
    ``(σ [pos], w, b, centred)``."""
    cfg = model.cfg
    d = cfg.d_model
    if cfg.normalization_type is None:
        return torch.ones(cache["hook_embed"].shape[1], dtype=dtype), torch.ones(d, dtype=dtype), \
            torch.zeros(d, dtype=dtype), False
    module = model.get_submodule(scale_hook.rsplit(".", 1)[0])   # the hook is an attribute of its norm
    sigma = cache[scale_hook][row, :, 0].to(dtype)
    w = getattr(module, "w", None)
    b = getattr(module, "b", None)
    w = w.detach().to(dtype) if isinstance(w, torch.Tensor) else torch.ones(d, dtype=dtype)
    b = b.detach().to(dtype) if isinstance(b, torch.Tensor) else torch.zeros(d, dtype=dtype)
    return sigma, w, b, True


def _centre(v: torch.Tensor, centred: bool) -> torch.Tensor:
    return v - v.mean(-1, keepdim=True) if centred else v


_CHUNK = 256   # features per target block of an SAE / transcoder: the unit of work a pruned build skips


@dataclass
class _Job:
    """The incoming edges of ``targets`` (node indices, one stream point) from ``sources``:
    ``compute()`` returns the ``[targets, sources]`` block. The same job gives the same block
    bit for bit whether or not other jobs run, so a pruned build's edges equal the full build's."""

    stream: int
    targets: torch.Tensor
    sources: torch.Tensor
    compute: Callable[[], torch.Tensor]


def _gate(model: Any, cache: Mapping[str, torch.Tensor], layer: int, dtype: torch.dtype) -> torch.Tensor:
    """The MLP's frozen activation gate ``act(pre) / pre`` ``[pos, d_mlp]`` (0 where pre is 0)."""
    pre = cache[act_name("pre", layer)][0].to(dtype)
    post = cache[act_name("post", layer)][0].to(dtype)
    return torch.where(pre != 0, post / torch.where(pre != 0, pre, 1.0), torch.zeros_like(pre))


def _chunks(items: list[int]) -> list[list[int]]:
    return [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _decide(jobs: list[_Job], n: int, logit: int, min_influence: float, dtype: torch.dtype) -> torch.Tensor:
    """The first pass of a pruned build: from the logit backwards, each target's influence on the
    logit (as :func:`~tl_modular.attribution.influence` computes it over the edges of the targets
    decided so far) is final when the sweep reaches it; the targets below ``min_influence`` are
    skipped. No edge is held. Returns ``[n]`` booleans, the targets kept (given incoming edges)."""
    done = torch.zeros(n, dtype=torch.bool)
    infl = torch.zeros(n, dtype=dtype)
    infl[logit] = 1.0                       # the e term of e Σ Âᵏ: the logit's weight on its own row
    for job in sorted(jobs, key=lambda j: -j.stream):
        keep = infl[job.targets] >= min_influence
        if not keep.any():
            continue
        a = job.compute()[keep].abs()
        targets = job.targets[keep]
        done[targets] = True                # pass the targets' influence on to their sources
        weight = infl[targets] / a.sum(1).clamp_min(torch.finfo(dtype).tiny)
        infl.index_add_(0, job.sources, weight @ a)
    return done


def _sweep(jobs: list[_Job], emit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], int],
           kept: torch.Tensor | None = None, max_edges: int | None = None) -> int:
    """Run the jobs (only the ``kept`` targets' rows) and ``emit`` their blocks; ``emit`` returns
    the edges it kept. Past ``max_edges`` of them the sweep raises :class:`GraphTooLargeError`.
    Returns the number of edges emitted."""
    found = 0
    for job in jobs:
        keep = kept[job.targets] if kept is not None else None
        if keep is not None and not keep.any():
            continue
        block, targets = job.compute(), job.targets
        if keep is not None and not keep.all():
            block, targets = block[keep], targets[keep]
        found += emit(targets, job.sources, block)
        if max_edges is not None and found > max_edges:
            raise GraphTooLargeError(found, max_edges)
    return found


def _folded(sources: torch.Tensor, block: torch.Tensor, into: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block``'s columns summed by the node each source folds ``into``: ``(sources, block,
    present)``, ``present`` marking the edges with a nonzero part (as if each part were an edge of
    its own, merged after zeros were dropped)."""
    cols, inverse = torch.unique(into[sources], return_inverse=True)
    if cols.numel() == sources.numel():
        return into[sources], block, block != 0
    shape = (block.shape[0], cols.numel())
    summed = block.new_zeros(shape).index_add_(1, inverse, block)
    present = block.new_zeros(shape).index_add_(1, inverse, (block != 0).to(block.dtype)) != 0
    return cols, summed, present


@torch.no_grad()
def _one(model: Any, channels: ChannelSet, comp: Compression | None, saes: dict[str, Any], tokens: torch.Tensor,
         target: dict[str, list[int]], dtype: torch.dtype, min_influence: float | None = None,
         max_edges: int | None = None) -> AttributionGraph:
    cfg = model.cfg
    n_layers = cfg.n_layers
    tokens = tokens.to(cfg.device)[None]
    n_pos = tokens.shape[1]
    hooks = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale"}
    for layer in range(n_layers):
        hooks |= {act_name("scale", layer, "ln1"), act_name("scale", layer, "ln2"), act_name("pattern", layer),
                  act_name("z", layer), act_name("pre", layer), act_name("post", layer), act_name("mlp_out", layer),
                  act_name("resid_mid", layer)}
        if cfg.normalization_type is not None:
            hooks.add(act_name("normalized", layer, "ln2"))
    logits, cache = run_with_cache(model, tokens, names_filter=lambda n: n in hooks)
    cache = {k: v.detach().cpu() for k, v in cache.items()}
    logits = logits.detach().cpu().to(dtype)[0]
    f = lambda t: t.detach().cpu().to(dtype)  # noqa: E731
    weights: dict[tuple[int, str], torch.Tensor] = {}

    def weight(sae: Any, key: str) -> torch.Tensor:
        """An SAE's / transcoder's parameter in ``dtype``, converted once per graph."""
        if (id(sae), key) not in weights:
            weights[(id(sae), key)] = f(getattr(sae, key))
        return weights[(id(sae), key)]

    nodes: list[Node] = []
    writes: list[torch.Tensor] = []
    acts: list[float] = []
    pres: dict[int, float] = {}                          # SAE / transcoder features: pre-activation
    feature_of: dict[tuple[str, int], list[int]] = {}   # (channel, position) -> node indices of its features
    error_of: dict[tuple[str, int], int] = {}           # (channel, position) -> its error node
    transcoders = {name: tc for name, tc in saes.items() if _is_transcoder(tc)}

    def add(node: Node, vec: torch.Tensor, act: float = 1.0) -> int:
        nodes.append(node)
        writes.append(vec[None])
        acts.append(act)
        return len(nodes) - 1

    def add_many(new: list[Node], vecs: torch.Tensor, values: list[float]) -> list[int]:
        """Nodes with writes ``vecs`` ``[k, d_model]`` and activations ``values``; their indices."""
        nodes.extend(new)
        writes.append(vecs)
        acts.extend(values)
        return list(range(len(nodes) - len(new), len(nodes)))

    def sparse_features(c: Any, p: int, stream: int, sae: Any, pre: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Nodes of an SAE's / transcoder's active features and its error; returns the bias part ``b_dec``."""
        w_dec, b_dec = weight(sae, "W_dec"), weight(sae, "b_dec")
        a = pre.clamp_min(0)
        if hasattr(sae, "threshold"):                    # JumpReLU: zero at or below the threshold
            a = torch.where(pre > weight(sae, "threshold"), a, torch.zeros_like(a))
        on = (a != 0).nonzero()[:, 0]
        active = on.tolist()
        hook = sae.cfg.metadata.hook_name
        feature_of[(c.name, p)] = add_many([Node("feature", c.name, j, p, stream, hook) for j in active],
                                           a[on, None] * w_dec[on], a[on].tolist())
        pres.update(zip(feature_of[(c.name, p)], pre[on].tolist(), strict=True))
        error_of[(c.name, p)] = add(Node("error", c.name, None, p, stream), w - a[on] @ w_dec[on] - b_dec)
        return b_dec

    for p in range(n_pos):
        add(Node("embed", "embed", None, p, 0), f(cache["hook_embed"][0, p]))
        if "hook_pos_embed" in cache and cfg.positional_embedding_type == "standard":
            add(Node("pos_embed", "pos_embed", None, p, 0), f(cache["hook_pos_embed"][0, p]))
    sides: dict[str, Any] = {}
    for layer in range(n_layers):
        for stream, kind in ((2 * layer + 1, ("head", "bias")), (2 * layer + 2, ("mlp",))):
            chans = [c for c in channels.in_layer(layer) if c.kind in kind]
            # contributions() takes its shape from the final residual, which this cache does not hold
            row_cache = {k: v[0] for k, v in cache.items()} | {channels.final_hook: cache["hook_embed"][0]}
            w_all = channels.contributions(row_cache, [c.name for c in chans]).to(dtype)
            for p in range(n_pos):
                bias = torch.zeros(cfg.d_model, dtype=dtype)
                for c, w in zip(chans, w_all[:, p], strict=True):
                    if c.kind == "bias":
                        bias += w
                        continue
                    if c.name in transcoders:            # features read the MLP's input, write its output
                        tc = transcoders[c.name]
                        x = f(cache[tc.cfg.metadata.hook_name if "normalized" in tc.cfg.metadata.hook_name
                                    else act_name("resid_mid", layer)][0, p])
                        bias += sparse_features(c, p, stream, tc, x @ weight(tc, "W_enc") + weight(tc, "b_enc"), w)
                        continue
                    if c.name in saes:
                        sae = saes[c.name]
                        shift = weight(sae, "b_dec") * float(sae.cfg.apply_b_dec_to_input)
                        bias += sparse_features(c, p, stream, sae, (w - shift) @ weight(sae, "W_enc")
                                                + weight(sae, "b_enc"), w)
                        continue
                    if comp is None or c.name not in comp:
                        error_of[(c.name, p)] = add(Node("error", c.name, None, p, stream), w)
                        continue
                    side = comp[c.name].write
                    sides[c.name] = side
                    mu, enc, dec = f(side.mean), f(side.encoder), f(side.decoder)
                    a = (w - mu) @ enc
                    feature_of[(c.name, p)] = [add(Node("feature", c.name, j, p, stream), a[j] * dec[:, j], float(a[j]))
                                               for j in range(a.shape[0])]
                    error_of[(c.name, p)] = add(Node("error", c.name, None, p, stream), w - mu - a @ dec.T)
                    bias += mu
                add(Node("bias", None, None, p, stream), bias)
    n = len(nodes) + 1
    nodes.append(Node("logit", None, None, None, 2 * n_layers + 1))
    vec = torch.cat(writes)                                    # [n - 1, d_model]
    wpos = torch.tensor([nd.position for nd in nodes[:-1]])
    wstream = torch.tensor([nd.stream for nd in nodes[:-1]])
    activation = torch.tensor([*acts, 0.0], dtype=dtype)
    pre_activation = activation.clone()
    for i, v in pres.items():
        pre_activation[i] = v
    bias = torch.zeros(n, dtype=dtype)
    jobs: list[_Job] = []

    for layer in range(n_layers):
        jobs += _head_jobs(model, channels, comp, sides, layer, cache, vec, wpos, wstream, feature_of, bias,
                           activation, pre_activation, dtype)
        name = mlp_name(layer)
        if name in saes or (comp is not None and name in comp):
            jobs += _mlp_jobs(model, name, layer, saes.get(name), sides.get(name), cache, vec, wpos, wstream,
                              nodes, feature_of, bias, activation, pre_activation, dtype)
    jobs.append(_logit_job(model, target, cache, logits, vec, wpos, n, bias, activation, pre_activation, dtype))

    # a pruned build in two passes: the first decides which features are kept (holding no edge), the
    # second computes the kept targets' edges, a dropped feature's merged into its error node's as
    # they come, so the build never holds more edges than its graph has
    dropped = done = None
    into = torch.arange(n)                  # where each node's out-edges go: a dropped feature's to its error node
    if min_influence is not None:
        done = _decide(jobs, n, n - 1, min_influence, dtype)
        dropped = torch.tensor([nd.kind == "feature" for nd in nodes]) & ~done
        for i in dropped.nonzero()[:, 0].tolist():
            into[i] = error_of[(nodes[i].channel, nodes[i].position)]
    rows: list[torch.Tensor] = []
    cols: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []

    def emit(targets: torch.Tensor, sources: torch.Tensor, block: torch.Tensor) -> int:
        """``block[i, k]``: edge from ``sources[k]`` into ``targets[i]``; zeros dropped; a dropped
        feature's edges merged into its error node's. Returns the edges kept."""
        present = block != 0
        if dropped is not None:
            sources, block, present = _folded(sources, block, into)
        nz = present.nonzero(as_tuple=True)
        rows.append(targets[nz[0]])
        cols.append(sources[nz[1]])
        vals.append(block[nz])
        return int(nz[0].numel())

    found = _sweep(jobs, emit, done, max_edges)
    jobs.clear()                                               # their cached products of the sources' writes
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    values = torch.cat(vals)
    del rows[:], cols[:], vals[:]                              # the blocks, now copied: free them before coalescing
    # the edges the build held (what max_edges counts): a pruned build's with its dropped features' merged
    info: dict[str, Any] = {"n_layers": n_layers, "d_model": cfg.d_model, "edges_built": found}
    if transcoders:
        info["transcoders"] = {name: {"hook_in": tc.cfg.metadata.hook_name, "hook_out": tc.cfg.metadata.hook_name_out,
                                        "architecture": tc.cfg.architecture(), "d_sae": int(tc.cfg.d_sae)}
            for name, tc in transcoders.items()}
    full_writes = torch.cat([vec, vec.new_zeros(1, vec.shape[1])])
    if dropped is not None:
        info["min_influence"] = float(min_influence)
        info["dropped_features"] = int(dropped.sum())
        if dropped.any():                   # the edges are folded already; the writes and the numbering follow
            full_writes = full_writes.clone().index_add_(0, into[dropped], full_writes[dropped])
            keep = ~dropped
            index = (torch.cumsum(keep.long(), 0) - 1)[index]
            nodes = [nd for nd, k in zip(nodes, keep.tolist(), strict=True) if k]
            activation, pre_activation, bias = activation[keep], pre_activation[keep], bias[keep]
            full_writes = full_writes[keep]
            n = len(nodes)
    adjacency = torch.sparse_coo_tensor(index, values, (n, n), check_invariants=False).coalesce()
    return AttributionGraph(nodes=nodes, adjacency=adjacency, activation=activation,
                            pre_activation=pre_activation, bias=bias, tokens=tokens[0].cpu(), target=dict(target),
                            info=info, writes=full_writes)


def _head_jobs(model: Any, channels: ChannelSet, comp: Compression | None, sides: dict[str, Any], layer: int,
               cache: Mapping[str, torch.Tensor], vec: torch.Tensor, wpos: torch.Tensor, wstream: torch.Tensor,
               feature_of: dict[tuple[str, int], list[int]], bias: torch.Tensor, activation: torch.Tensor,
               pre_activation: torch.Tensor, dtype: torch.dtype) -> list[_Job]:
    """Attention write directions: they read resid_pre (streams <= 2l) at every earlier position
    through the frozen pattern. One job per head and position; the head's ``[sources, r]``
    product is shared by its positions and computed on first use."""
    f = lambda t: t.detach().cpu().to(dtype)  # noqa: E731
    block = model.blocks[layer]
    sigma, w_ln, b_ln, centred = _ln(model, act_name("scale", layer, "ln1"), cache, 0, dtype)
    src = (wstream <= 2 * layer).nonzero()[:, 0]
    pattern = f(cache[act_name("pattern", layer)][0])      # [head, pos_q, pos_k]
    z = f(cache[act_name("z", layer)][0])
    shared: dict[str, torch.Tensor] = {}
    jobs = []
    for c in channels.in_layer(layer):
        if c.kind != "head" or comp is None or c.name not in comp:
            continue
        mu, enc = f(sides[c.name].mean), f(sides[c.name].encoder)
        w_v, w_o, b_v = f(block.attn.W_V[c.head]), f(block.attn.W_O[c.head]), f(block.attn.b_V[c.head])
        ov_e = w_v @ (w_o @ enc)                           # [d_model, r]
        per_pos = pattern[c.head][:, wpos[src]] / sigma[wpos[src]]   # [pos_q, n_src]
        const = (b_ln @ w_v + b_v) @ (w_o @ enc)           # through the pattern, whose rows sum to 1
        act = (z[:, c.head] @ w_o - mu) @ enc              # [pos, r]

        def y(name: str = c.name, ov_e: torch.Tensor = ov_e) -> torch.Tensor:
            if "xs" not in shared:
                shared["xs"] = _centre(vec[src], centred) * w_ln        # [n_src, d_model]
            if name not in shared:
                shared[name] = shared["xs"] @ ov_e                     # [n_src, r]
            return shared[name]

        for p in range(pattern.shape[1]):
            tgt = torch.tensor(feature_of[(c.name, p)])
            bias[tgt] = pattern[c.head, p].sum() * const - mu @ enc
            activation[tgt] = pre_activation[tgt] = act[p]
            jobs.append(_Job(2 * layer + 1, tgt, src, lambda y=y, w=per_pos[p]: y().T * w))
    return jobs


def _mlp_jobs(model: Any, name: str, layer: int, sae: Any, side: Any, cache: Mapping[str, torch.Tensor],
              vec: torch.Tensor, wpos: torch.Tensor, wstream: torch.Tensor, nodes: list[Node],
              feature_of: dict[tuple[str, int], list[int]], bias: torch.Tensor, activation: torch.Tensor,
              pre_activation: torch.Tensor, dtype: torch.dtype) -> list[_Job]:
    """The MLP's nodes read resid_mid (streams <= 2l + 1) at their own position: write directions and
    SAE features on its output through the frozen gate, transcoder features straight from their
    input (ln2.hook_normalized through the frozen LayerNorm scale, or resid_mid itself)."""
    f = lambda t: t.detach().cpu().to(dtype)  # noqa: E731
    mlp = model.blocks[layer].mlp
    sigma, w_ln, b_ln, centred = _ln(model, act_name("scale", layer, "ln2"), cache, 0, dtype)
    if sae is not None and _is_transcoder(sae):
        # TransformerLens' hook_normalized holds (P x) / σ, before the norm's w and b; hook_resid_mid
        # (and hook_mlp_in) the residual stream itself
        w_ln, b_ln = torch.ones_like(w_ln), torch.zeros_like(b_ln)
        if "normalized" not in sae.cfg.metadata.hook_name:
            sigma, centred = sigma.new_ones(sigma.shape), False
    inputs: dict[int, torch.Tensor] = {}

    def x_in(p: int, src: torch.Tensor) -> torch.Tensor:
        """The sources' writes as the MLP (or transcoder) reads them at position ``p``: ``[n_src, d_model]``."""
        if p not in inputs:
            inputs[p] = _centre(vec[src], centred) * w_ln
        return inputs[p]

    n_pos = int(wpos.max()) + 1
    jobs = []
    if sae is not None:
        w_enc, b_enc = f(sae.W_enc), f(sae.b_enc)
        if _is_transcoder(sae):
            read, const = w_enc, b_ln @ w_enc + b_enc
        else:
            w_in, b_in, w_out, b_out = (f(getattr(mlp, k)) for k in ("W_in", "b_in", "W_out", "b_out"))
            gate = _gate(model, cache, layer, dtype)
            offset = f(sae.b_dec) * float(sae.cfg.apply_b_dec_to_input)
        for p in range(n_pos):
            src = ((wstream <= 2 * layer + 1) & (wpos == p)).nonzero()[:, 0]
            for chunk in _chunks(feature_of[(name, p)]):
                idx = [nodes[i].index for i in chunk]
                tgt = torch.tensor(chunk)
                if _is_transcoder(sae):
                    bias[tgt] = const[idx]
                    compute = lambda p=p, src=src, e=read[:, idx]: (x_in(p, src) @ e / sigma[p]).T  # noqa: E731
                else:
                    out_e = w_out @ w_enc[:, idx]
                    bias[tgt] = ((b_ln @ w_in + b_in) * gate[p]) @ out_e + (b_out - offset) @ w_enc[:, idx] + b_enc[idx]
                    compute = lambda p=p, src=src, e=out_e: ((x_in(p, src) @ w_in * gate[p]) @ e / sigma[p]).T  # noqa: E731
                jobs.append(_Job(2 * layer + 2, tgt, src, compute))
        return jobs
    mu, enc = f(side.mean), f(side.encoder)
    w_in, b_in, w_out, b_out = (f(getattr(mlp, k)) for k in ("W_in", "b_in", "W_out", "b_out"))
    gate = _gate(model, cache, layer, dtype)
    out_e = w_out @ enc                                # [d_mlp, r]
    act = (f(cache[act_name("mlp_out", layer)][0]) - mu) @ enc
    for p in range(n_pos):
        src = ((wstream <= 2 * layer + 1) & (wpos == p)).nonzero()[:, 0]
        tgt = torch.tensor(feature_of[(name, p)])
        bias[tgt] = ((b_ln @ w_in + b_in) * gate[p]) @ out_e + (b_out - mu) @ enc
        activation[tgt] = pre_activation[tgt] = act[p]
        jobs.append(_Job(2 * layer + 2, tgt, src,
                         lambda p=p, src=src: ((x_in(p, src) @ w_in * gate[p]) @ out_e / sigma[p]).T))
    return jobs


def _logit_job(model: Any, target: dict[str, list[int]], cache: Mapping[str, torch.Tensor], logits: torch.Tensor,
               vec: torch.Tensor, wpos: torch.Tensor, n: int, bias: torch.Tensor, activation: torch.Tensor,
               pre_activation: torch.Tensor, dtype: torch.dtype) -> _Job:
    """The logit node: mean over scored positions of ``logit[answer]`` (- ``logit[wrong]``), one row
    over every source."""
    f = lambda t: t.detach().cpu().to(dtype)  # noqa: E731
    sigma, w_ln, b_ln, centred = _ln(model, "ln_final.hook_scale", cache, 0, dtype)
    w_u, b_u = f(model.W_U), f(model.b_U)
    positions, answers = target["positions"], target["answers"]
    wrong = target.get("wrong_answers")
    k = len(positions)
    row = torch.zeros(n - 1, dtype=dtype)
    logit_value, logit_bias = 0.0, 0.0
    for i, p in enumerate(positions):
        u = w_u[:, answers[i]] - (w_u[:, wrong[i]] if wrong else 0)
        ub = b_u[answers[i]] - (b_u[wrong[i]] if wrong else 0)
        src = (wpos == p).nonzero()[:, 0]
        row[src] += (_centre(vec[src], centred) * w_ln) @ u / sigma[p] / k
        logit_bias += float((b_ln @ u + ub) / k)
        logit_value += float((logits[p, answers[i]] - (logits[p, wrong[i]] if wrong else 0)) / k)
    activation[-1] = pre_activation[-1] = logit_value
    bias[-1] = logit_bias
    return _Job(2 * model.cfg.n_layers + 1, torch.tensor([n - 1]), torch.arange(n - 1), lambda: row[None])
