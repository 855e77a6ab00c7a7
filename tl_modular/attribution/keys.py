"""Key attribution: what each source node does to the logit through the attention *keys* of a head.

The graph's edges freeze attention, so key/query composition (a previous-token head feeding the
induction heads' keys) has no edge. With the query of head ``h`` at position ``q`` held at its
clean value and LayerNorm scales frozen, the score ``s[q, k] = q_q · rot_k(x̂_k W_K + b_K) / scale``
is affine in the residual at ``k``, so it splits exactly over the sources written at ``k``:
``s[q, k] = Σ_s q_q · rot_k((P w_s ⊙ w_ln) / σ_k W_K) / scale + const`` (checked against
TransformerLens' ``hook_attn_scores``). A source's key attribution is this contribution times the
gradient of the logit node with respect to the score, summed over queries — a first-order
(attribution-patching) estimate, not an exact decomposition of the logit.

>>> tlm.attribution.key_attribution(model, graph, heads=["L1.H1"])   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tl_modular._hooks import run_with_cache, run_with_hooks
from tl_modular._names import act_name, head_name, parse
from tl_modular.attribution.graph import AttributionGraph

__all__ = ["key_attribution", "key_contributions"]


def _rotations(attn: Any, n_pos: int, d_head: int, dtype: torch.dtype) -> torch.Tensor:
    """``[pos, d_head, d_head]``: the rotary map of each position as a matrix acting on row vectors."""
    eye = torch.eye(d_head, dtype=attn.rotary_sin.dtype, device=attn.rotary_sin.device)
    x = eye[:, None, None, :].expand(d_head, n_pos, 1, d_head).contiguous()
    return attn.apply_rotary(x, 0).to("cpu", dtype)[:, :, 0].transpose(0, 1)


@torch.no_grad()
def key_contributions(model: Any, graph: AttributionGraph, head: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact split of ``head``'s attention scores over the graph's sources at the key position.

    Returns:
        ``(sources [n_src], contrib [pos_q, n_src], const [pos_q, pos_k])``: for every query ``q`` and
        key ``k ≤ q``, ``Σ_{s at k} contrib[q, s] + const[q, k]`` is the clean score.
    """
    if graph.writes is None:
        raise ValueError("this graph holds no writes (it was loaded from JSON); build it with tlm.attribution_graph")
    name = parse(head)
    if name.kind != "head":
        raise ValueError(f"head must name an attention head like 'L1.H2', got {head!r}")
    cfg = model.cfg
    if cfg.positional_embedding_type not in ("rotary", "standard") or cfg.normalization_type not in ("LN", "LNPre"):
        raise ValueError("key attribution supports rotary or standard positions with LayerNorm")
    layer, h = name.layer, name.head
    attn = model.blocks[layer].attn
    dtype = graph.writes.dtype
    tokens = graph.tokens[None].to(cfg.device)
    q_hook = act_name("rot_q" if cfg.positional_embedding_type == "rotary" else "q", layer)
    hooks = {q_hook, act_name("scale", layer, "ln1")}
    _, cache = run_with_cache(model, tokens, names_filter=lambda n: n in hooks)
    q = cache[q_hook][0, :, h].to("cpu", dtype)                      # [pos, d_head]
    sigma = cache[act_name("scale", layer, "ln1")][0, :, 0].to("cpu", dtype)
    ln = model.blocks[layer].ln1
    w_ln = ln.w.detach().to("cpu", dtype) if hasattr(ln, "w") else torch.ones(cfg.d_model, dtype=dtype)
    b_ln = ln.b.detach().to("cpu", dtype) if hasattr(ln, "b") else torch.zeros(cfg.d_model, dtype=dtype)
    w_k = attn.W_K[h].detach().to("cpu", dtype)
    b_k = attn.b_K[h].detach().to("cpu", dtype)
    n_pos = q.shape[0]
    scale = float(attn.attn_scale)
    sources = torch.tensor([i for i, n in enumerate(graph.nodes) if n.kind != "logit" and n.stream <= 2 * layer])
    pos = torch.tensor([graph.nodes[i].position for i in sources.tolist()])
    w = graph.writes[sources]
    keys = ((w - w.mean(-1, keepdim=True)) * w_ln / sigma[pos, None]) @ w_k       # [n_src, d_head]
    const_k = (b_ln @ w_k + b_k).expand(n_pos, -1)                                # [pos_k, d_head]
    if cfg.positional_embedding_type == "rotary":
        rot = _rotations(attn, n_pos, cfg.d_head, dtype)
        keys = torch.einsum("sd,sde->se", keys, rot[pos])
        const_k = torch.einsum("kd,kde->ke", const_k, rot)
    contrib = q @ keys.T / scale
    const = q @ const_k.T / scale
    return sources, contrib, const


def key_attribution(model: Any, graph: AttributionGraph, heads: Sequence[str] | None = None) -> torch.Tensor:
    """``[n]``: each node's first-order effect on the logit node through the keys of ``heads`` (all heads
    by default): ``Σ_q ∂logit/∂score[q, k_s] · contrib[q, s]``, over every query ``q ≥ k_s``.

    >>> key = tlm.attribution.key_attribution(model, graph, heads=["L1.H1"])   # doctest: +SKIP
    """
    cfg = model.cfg
    if heads is None:
        heads = [head_name(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    layers = sorted({parse(h).layer for h in heads})
    tokens = graph.tokens[None].to(cfg.device)
    scores: dict[int, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: Any) -> torch.Tensor:
        scores[hook.layer()] = x
        return x

    t = graph.target
    with torch.enable_grad():
        hooks = [(act_name("attn_scores", layer), keep) for layer in layers]
        logits = run_with_hooks(model, tokens, fwd_hooks=hooks)[0]
        wrong = t.get("wrong_answers")
        metric = sum(logits[p, a] - (logits[p, wrong[i]] if wrong else 0)
                     for i, (p, a) in enumerate(zip(t["positions"], t["answers"], strict=True))) / len(t["positions"])
        grads = torch.autograd.grad(metric, [scores[layer] for layer in layers])   # no .grad left on the model
    grad = {layer: g[0].detach().to("cpu", graph.writes.dtype) for layer, g in zip(layers, grads, strict=True)}
    out = torch.zeros(len(graph), dtype=graph.writes.dtype)
    for head in heads:
        name = parse(head)
        sources, contrib, _ = key_contributions(model, graph, head)
        pos = torch.tensor([graph.nodes[i].position for i in sources.tolist()])
        g = torch.tril(grad[name.layer][name.head])[:, pos]                      # [pos_q, n_src]
        out.index_add_(0, sources, (g * contrib).sum(0))
    return out
