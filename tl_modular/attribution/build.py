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

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from tl_modular._hooks import run_with_cache
from tl_modular._models import check_supported
from tl_modular._names import act_name, hook_layer, mlp_name
from tl_modular.attribution.graph import AttributionGraph, Node
from tl_modular.segmentation import ChannelSet, segment

if TYPE_CHECKING:
    from tl_modular.compression import Compression

__all__ = ["attribution_graph", "unsupported"]


def _is_sae(x: Any) -> bool:
    return hasattr(x, "W_enc") and hasattr(x, "W_dec") and hasattr(x, "cfg")


def _units(model: Any, units: Any) -> tuple[Any, dict[str, Any]]:
    """``(compression or None, {MLP channel: SAE})`` from what ``units`` holds."""
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
                raise ValueError(f"units holds two SAEs on {hook!r}; pass one per hook")
            saes[name] = item
        else:
            raise TypeError(f"units must be a tlm.Compression (from tlm.compress(model, tokens)), an sae-lens SAE on "
                            f"an MLP's output, a mapping of them (tlm.sae.bundled()) or a list of these; got "
                            f"{type(item).__name__}")
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
                      dtype: torch.dtype = torch.float64) -> AttributionGraph | list[AttributionGraph]:
    """Attribution graph(s) of ``model`` on ``tokens`` over the write directions of ``units``.

    Args:
        model: A ``HookedTransformer`` with LayerNorm and elementwise MLPs (the model is only run
            with a cache; no hook stays on it).
        tokens: ``[pos]`` or ``[1, pos]`` token ids (one graph), ``[batch, pos]`` (a list, row by
            row), or a :class:`~tl_modular.Task` (one graph per prompt, its target from the task).
        units: A :class:`~tl_modular.Compression` (each compressed channel's write side gives one
            feature node per direction kept, ``side.rank``, and position), standard sae-lens SAEs
            on MLP outputs (``blocks.{l}.hook_mlp_out``: one node per feature active at a position;
            they take the place of that MLP's write side), a mapping of them (``tlm.sae.bundled()``
            filtered to ``hook_mlp_out``) or a list of these. Channels covered by neither become
            error nodes.
        target: With plain tokens: ``{"positions": [...], "answers": [...], "wrong_answers":
            [...]}`` (wrong answers optional; the logit node is the mean over the positions of
            the logit, or logit difference).
        dtype: Arithmetic precision (float64 by default, so completeness holds to ~1e-12 on a
            float64 model and to fp32 rounding on a float32 one).

    Returns:
        One :class:`AttributionGraph` for ``[pos]`` or ``[1, pos]`` tokens, else a list of them
        (always a list for a Task).

    Raises:
        TypeError / ValueError: an unsupported model, ``units`` not a Compression, a missing or
            malformed target, tokens of the wrong shape.

    >>> g = tlm.attribution_graph(model, task[0], units=comp)[0]        # doctest: +SKIP
    >>> g.completeness() < 1e-5                                          # doctest: +SKIP
    True
    """

    from tl_modular.tasks import Task  # tasks is a lazily loaded package

    channels, comp, saes = _check(model, units)
    if isinstance(tokens, Task):
        task = tokens
        rows = [(task.clean[i], {"positions": task.positions[i], "answers": task.answers[i],
                                 "wrong_answers": None if task.wrong_answers is None or task.metric_kind != "logit_diff"
                                 else task.wrong_answers[i]}) for i in range(len(task))]
        graphs = [_one(model, channels, comp, saes, t, _targets(tg, len(t), model.cfg.d_vocab), dtype)
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
    graphs = [_one(model, channels, comp, saes, row, tg, dtype) for row in rows]
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


@torch.no_grad()
def _one(model: Any, channels: ChannelSet, comp: Compression | None, saes: dict[str, Any], tokens: torch.Tensor,
         target: dict[str, list[int]], dtype: torch.dtype) -> AttributionGraph:
    cfg = model.cfg
    n_layers = cfg.n_layers
    tokens = tokens.to(cfg.device)[None]
    n_pos = tokens.shape[1]
    hooks = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale"}
    for layer in range(n_layers):
        hooks |= {act_name("scale", layer, "ln1"), act_name("scale", layer, "ln2"), act_name("pattern", layer),
                  act_name("z", layer), act_name("pre", layer), act_name("post", layer), act_name("mlp_out", layer)}
    logits, cache = run_with_cache(model, tokens, names_filter=lambda n: n in hooks)
    cache = {k: v.detach().cpu() for k, v in cache.items()}
    logits = logits.detach().cpu().to(dtype)[0]
    f = lambda t: t.detach().cpu().to(dtype)  # noqa: E731
    nodes: list[Node] = []
    writes: list[torch.Tensor] = []
    acts: list[float] = []
    pres: dict[int, float] = {}                          # SAE features: pre-activation when it differs
    feature_of: dict[tuple[str, int], list[int]] = {}   # (channel, position) -> node indices of its features

    def add(node: Node, vec: torch.Tensor, act: float = 1.0) -> int:
        nodes.append(node)
        writes.append(vec)
        acts.append(act)
        return len(nodes) - 1

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
                    if c.name in saes:
                        sae = saes[c.name]
                        w_enc, b_enc, w_dec, b_dec = (f(getattr(sae, k)) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
                        pre = (w - b_dec * float(sae.cfg.apply_b_dec_to_input)) @ w_enc + b_enc
                        a = pre.clamp_min(0)
                        active = (a > 0).nonzero()[:, 0].tolist()
                        hook = sae.cfg.metadata.hook_name
                        feature_of[(c.name, p)] = [add(Node("feature", c.name, j, p, stream, hook),
                                                       a[j] * w_dec[j], float(a[j])) for j in active]
                        pres.update((i, float(pre[j])) for i, j in zip(feature_of[(c.name, p)], active, strict=True))
                        add(Node("error", c.name, None, p, stream), w - a @ w_dec - b_dec)
                        bias += b_dec
                        continue
                    if comp is None or c.name not in comp:
                        add(Node("error", c.name, None, p, stream), w)
                        continue
                    side = comp[c.name].write
                    sides[c.name] = side
                    mu, enc, dec = f(side.mean), f(side.encoder), f(side.decoder)
                    a = (w - mu) @ enc
                    feature_of[(c.name, p)] = [add(Node("feature", c.name, j, p, stream), a[j] * dec[:, j], float(a[j]))
                                               for j in range(a.shape[0])]
                    add(Node("error", c.name, None, p, stream), w - mu - a @ dec.T)
                    bias += mu
                add(Node("bias", None, None, p, stream), bias)
    n = len(nodes) + 1
    nodes.append(Node("logit", None, None, None, 2 * n_layers + 1))
    vec = torch.stack(writes)                                  # [n - 1, d_model]
    wpos = torch.tensor([nd.position for nd in nodes[:-1]])
    wstream = torch.tensor([nd.stream for nd in nodes[:-1]])
    activation = torch.tensor([*acts, 0.0], dtype=dtype)
    pre_activation = activation.clone()
    for i, v in pres.items():
        pre_activation[i] = v
    bias = torch.zeros(n, dtype=dtype)
    rows: list[torch.Tensor] = []
    cols: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []

    def emit(targets: torch.Tensor, sources: torch.Tensor, block: torch.Tensor) -> None:
        """``block[i, k]``: edge from ``sources[k]`` into ``targets[i]``; zeros dropped."""
        nz = block.nonzero(as_tuple=True)
        rows.append(targets[nz[0]])
        cols.append(sources[nz[1]])
        vals.append(block[nz])

    for layer in range(n_layers):
        block = model.blocks[layer]
        # attention: targets read resid_pre (streams <= 2l) at every earlier position through the pattern
        sigma, w_ln, b_ln, centred = _ln(model, act_name("scale", layer, "ln1"), cache, 0, dtype)
        src = (wstream <= 2 * layer).nonzero()[:, 0]
        xs = _centre(vec[src], centred) * w_ln                 # [n_src, d_model]
        pattern = f(cache[act_name("pattern", layer)][0])      # [head, pos_q, pos_k]
        z = f(cache[act_name("z", layer)][0])
        for c in channels.in_layer(layer):
            if c.kind != "head" or comp is None or c.name not in comp:
                continue
            side = sides[c.name]
            mu, enc = f(side.mean), f(side.encoder)
            w_v, w_o, b_v = f(block.attn.W_V[c.head]), f(block.attn.W_O[c.head]), f(block.attn.b_V[c.head])
            ov_e = w_v @ (w_o @ enc)                           # [d_model, r]
            y = xs @ ov_e                                      # [n_src, r]
            per_pos = pattern[c.head][:, wpos[src]] / sigma[wpos[src]]   # [pos_q, n_src]
            const = (b_ln @ w_v + b_v) @ (w_o @ enc)           # through the pattern, whose rows sum to 1
            act = (z[:, c.head] @ w_o - mu) @ enc              # [pos, r]
            for p in range(n_pos):
                tgt = torch.tensor(feature_of[(c.name, p)])
                emit(tgt, src, y.T * per_pos[p])
                bias[tgt] = pattern[c.head, p].sum() * const - mu @ enc
                activation[tgt] = pre_activation[tgt] = act[p]
        # MLP: targets read resid_mid (streams <= 2l + 1) at their own position, gate frozen
        sigma, w_ln, b_ln, centred = _ln(model, act_name("scale", layer, "ln2"), cache, 0, dtype)
        name = mlp_name(layer)
        if name in saes:
            sae = saes[name]
            w_enc, b_enc, b_dec = (f(getattr(sae, k)) for k in ("W_enc", "b_enc", "b_dec"))
            offset = b_dec * float(sae.cfg.apply_b_dec_to_input)
            w_in, b_in, w_out, b_out = (f(getattr(block.mlp, k)) for k in ("W_in", "b_in", "W_out", "b_out"))
            pre, post = f(cache[act_name("pre", layer)][0]), f(cache[act_name("post", layer)][0])
            gate = torch.where(pre != 0, post / torch.where(pre != 0, pre, 1.0), torch.zeros_like(pre))
            for p in range(n_pos):
                tgt_nodes = feature_of[(name, p)]
                if not tgt_nodes:
                    continue
                enc = w_enc[:, [nodes[i].index for i in tgt_nodes]]
                src = ((wstream <= 2 * layer + 1) & (wpos == p)).nonzero()[:, 0]
                y = ((_centre(vec[src], centred) * w_ln) @ w_in * gate[p]) @ (w_out @ enc) / sigma[p]
                tgt = torch.tensor(tgt_nodes)
                emit(tgt, src, y.T)
                bias[tgt] = ((b_ln @ w_in + b_in) * gate[p]) @ (w_out @ enc) + (b_out - offset) @ enc \
                    + b_enc[[nodes[i].index for i in tgt_nodes]]
        elif comp is not None and name in comp:
            side = sides[name]
            mu, enc = f(side.mean), f(side.encoder)
            w_in, b_in, w_out, b_out = (f(getattr(block.mlp, k)) for k in ("W_in", "b_in", "W_out", "b_out"))
            pre, post = f(cache[act_name("pre", layer)][0]), f(cache[act_name("post", layer)][0])
            gate = torch.where(pre != 0, post / torch.where(pre != 0, pre, 1.0), torch.zeros_like(pre))
            out_e = w_out @ enc                                # [d_mlp, r]
            act = (f(cache[act_name("mlp_out", layer)][0]) - mu) @ enc
            for p in range(n_pos):
                src = ((wstream <= 2 * layer + 1) & (wpos == p)).nonzero()[:, 0]
                y = ((_centre(vec[src], centred) * w_ln) @ w_in * gate[p]) @ out_e / sigma[p]
                tgt = torch.tensor(feature_of[(name, p)])
                emit(tgt, src, y.T)
                bias[tgt] = ((b_ln @ w_in + b_in) * gate[p]) @ out_e + (b_out - mu) @ enc
                activation[tgt] = pre_activation[tgt] = act[p]
    # logit node: mean over scored positions of logit[answer] (- logit[wrong])
    sigma, w_ln, b_ln, centred = _ln(model, "ln_final.hook_scale", cache, 0, dtype)
    w_u, b_u = f(model.W_U), f(model.b_U)
    positions, answers = target["positions"], target["answers"]
    wrong = target.get("wrong_answers")
    k = len(positions)
    logit_value, logit_bias = 0.0, 0.0
    logit_index = torch.tensor([n - 1])
    for i, p in enumerate(positions):
        u = w_u[:, answers[i]] - (w_u[:, wrong[i]] if wrong else 0)
        ub = b_u[answers[i]] - (b_u[wrong[i]] if wrong else 0)
        src = (wpos == p).nonzero()[:, 0]
        emit(logit_index, src, ((_centre(vec[src], centred) * w_ln) @ u / sigma[p] / k)[None])
        logit_bias += float((b_ln @ u + ub) / k)
        logit_value += float((logits[p, answers[i]] - (logits[p, wrong[i]] if wrong else 0)) / k)
    activation[-1] = logit_value
    pre_activation[-1] = logit_value
    bias[-1] = logit_bias
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    adjacency = torch.sparse_coo_tensor(index, torch.cat(vals), (n, n), check_invariants=False).coalesce()
    return AttributionGraph(nodes=nodes, adjacency=adjacency, activation=activation,
                            pre_activation=pre_activation, bias=bias,
                            tokens=tokens[0].cpu(), target=dict(target),
                            info={"n_layers": n_layers, "d_model": cfg.d_model},
                            writes=torch.cat([vec, vec.new_zeros(1, vec.shape[1])]))
