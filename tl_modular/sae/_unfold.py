"""A channel's read or write subspace in an SAE's feature basis, and the graph unfolded to features.

Read side: the SAE sits where the channel reads (``hook_resid_pre`` / ``hook_resid_mid`` or its
normalized input); the channel sees ``Bᵀ ŷ`` through its read basis B, so feature f brings it
``z_f Bᵀ d̃_f`` (``d̃_f`` the feature's direction as the channel reads it, see
:mod:`tl_modular.sae._readers`). Write side: the SAE sits on the channel's output (``hook_mlp_out``,
``attn.hook_z`` through the head's ``W_O``) or on a residual hook after it; the features are seen
through the channel's write basis. Either way feature f's *weight* is its energy in the subspace,
``E[z_f²] ‖Bᵀ d̃_f‖²``, and the top m features *explain* ``1 − E‖Bᵀ(x − x̂_m)‖² / E‖Bᵀ(x − x̄)‖²`` of
the subspace's activity, with x̂_m the SAE's reconstruction from those m features and every other
feature held at its mean (the project's convention for discarded parts); the error node carries
``1 − explained(all)`` and the features share the rest in proportion to their energies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import networkx as nx
import numpy as np
import torch

from tl_modular._names import hook_kind, hook_layer, is_residual, port_name, stream_index
from tl_modular.sae._attach import check_fits, collect
from tl_modular.sae._readers import to_hook
from tl_modular.segmentation import Channel, segment

if TYPE_CHECKING:
    from sae_lens import SAE

    from tl_modular.compression import Compression
    from tl_modular.graph import ChannelGraph


@dataclass
class Unfolding:
    """One side of one channel in an SAE's features (see the module docs).

    ``features`` are ordered by ``weights`` (what the SAE explains of the subspace, shared in
    proportion to the features' energies, so ``weights.sum() + error_weight == 1``, ``error_weight``
    being what it misses); ``explained[m - 1]`` (m ≤ ``max_features``) is the
    fraction of the subspace's activity the top m features explain; ``error`` what the whole SAE
    misses there.
    """

    channel: str
    side: Literal["read", "write"]
    hook: str
    features: list[int]
    weights: np.ndarray
    error_weight: float
    explained: np.ndarray
    error: float
    rank: int
    port: str | None = None

    def top(self, n: int = 10) -> list[tuple[int, float]]:
        return [(f, float(w)) for f, w in zip(self.features[:n], self.weights[:n], strict=True)]


def _write_directions(model: Any, channel: Channel, sae: SAE, hook: str) -> torch.Tensor:
    """Feature directions in residual coordinates for an SAE on (or after) ``channel``'s output."""
    d = sae.W_dec.detach().float()
    if hook_kind(hook) == "z":
        if channel.kind != "head":
            raise ValueError(f"an SAE on {hook} unfolds heads, not {channel.name}")
        n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
        block = d.reshape(d.shape[0], n_heads, d_head)[:, channel.head]
        return block @ channel.weights["W_O"].detach().float()
    if d.shape[1] != model.cfg.d_model:
        raise ValueError(f"an SAE on {hook} ({d.shape[1]} wide) is not in residual coordinates; "
                         "write sides unfold with SAEs on hook_mlp_out, attn.hook_z or a residual hook")
    return d


def _write_hook_ok(channel: Channel, hook: str) -> bool:
    if hook == channel.source_hook or hook_kind(hook) == "z" and channel.kind == "head":
        return True
    if not is_residual(hook):
        return False
    # a residual hook at or after the point the write appears
    return stream_index(hook) >= stream_index(channel.writes) if hook_layer(channel.writes) is not None else True


@torch.no_grad()
def unfold(model: Any, comp: Compression, name: str, sae: SAE, tokens: torch.Tensor, *,
           side: Literal["read", "write"] | None = None, port: str | None = None,
           attention_mask: torch.Tensor | None = None, max_tokens: int = 16_384,
           max_features: int = 64, batch_size: int = 32) -> Unfolding:
    """Express channel ``name``'s read (or write) subspace in ``sae``'s features.

    ``side`` defaults to wherever the SAE sits: on the channel's input → read, on its output →
    write; a transcoder (sae-lens ``Transcoder``, e.g. from :func:`train_transcoder`) unfolds an
    MLP's write side with features computed from its input. ``port`` picks a head's q/k/v read side
    (default: the port with the largest rank).

    >>> u = tlm.sae.unfold(model, comp, "L0.MLP", saes["blocks.0.hook_mlp_out"], tokens)   # doctest: +SKIP
    >>> u.top(5), u.explained[4], u.error                                               # doctest: +SKIP
    """
    hook = check_fits(sae, model)
    c = segment(model)[name]
    cc = comp[name]
    out_hook = getattr(sae.cfg.metadata, "hook_name_out", None) if getattr(sae.cfg, "d_out", None) else None
    if out_hook is not None:                     # a transcoder: features from the input, written to the output
        if side == "read":
            raise ValueError("a transcoder unfolds what its MLP writes: use side='write' (or an SAE for the read side)")
        side = "write"
    if side is None:
        side = "read" if (hook in c.reads or hook == c.input_hook) else "write"
    if side == "read":
        if port is None:
            port = max(cc.read, key=lambda p: cc.read[p].rank)
        basis = cc.read[port].basis.detach().float()
        basis_hook, scale_hook = to_hook(model, c, basis, hook)
        dirs = sae.W_dec.detach().float()
    else:
        if not _write_hook_ok(c, out_hook or hook):
            raise ValueError(f"{name} writes at {c.source_hook} (into {c.writes}); an SAE at {out_hook or hook!r} "
                             "does not see that write")
        basis_hook, scale_hook = cc.write.basis.detach().float(), None
        dirs = _write_directions(model, c, sae, out_hook or hook)
    hooks = [hook] + [h for h in (scale_hook, out_hook) if h]
    acts = collect(model, tokens, hooks, attention_mask=attention_mask, batch_size=batch_size, max_tokens=max_tokens)
    z = sae.encode(acts[hook].to(sae.W_dec.dtype)).float()
    x = acts[out_hook or hook].float()           # what the features reconstruct
    factor = torch.ones(x.shape[0]) if scale_hook is None else 1.0 / acts[scale_hook].reshape(-1).float()
    b_dec = sae.b_dec.detach().float()
    proj_d = dirs @ basis_hook                                       # [d_sae, r]: each feature as B sees it
    if side == "read":
        # the channel sees (x @ B) / σ; the SAE's bias is part of its reconstruction, so take it out
        centred = ((x - b_dec) @ basis_hook) * factor[:, None]
        zf = z * factor[:, None]
    elif hook_kind(hook) == "z":                                     # the head's own write, through W_O
        heads = (x - b_dec).reshape(x.shape[0], model.cfg.n_heads, model.cfg.d_head)[:, c.head]
        centred = heads @ c.weights["W_O"].detach().float() @ basis_hook
        zf = z
    else:
        centred = (x - b_dec) @ basis_hook
        zf = z
    centred = centred - centred.mean(0)
    actual = (x @ basis_hook) * factor[:, None] if side == "read" else centred     # what the channel sees
    total = float(((actual - actual.mean(0)) ** 2).sum(1).mean())
    if total <= 0:
        raise ValueError(f"{name}'s {side} subspace carries no variance on these tokens")
    energy = (zf ** 2).mean(0) * (proj_d ** 2).sum(1)               # E[z_f²] ‖Bᵀ d_f‖²
    order = torch.argsort(energy, descending=True)
    alive = int((energy > 0).sum())
    order = order[:alive]
    # explained by the top m: residual after adding each feature's deviation from its mean
    resid = centred - (zf - zf.mean(0)) @ proj_d                    # what all features leave (error part)
    left = centred                                                  # every feature at its mean
    explained = []
    for f in order[:max_features].tolist():
        left = left - (zf[:, f] - zf[:, f].mean())[:, None] * proj_d[f][None]
        explained.append(1 - float((left ** 2).sum(1).mean()) / total)
    missed = min(1.0, float((resid ** 2).sum(1).mean()) / total)
    # the features share what the SAE explains in proportion to their energies (cross terms between
    # co-active features make exact per-feature attribution ill-defined); the error keeps the rest
    weights = (energy[order] / energy.sum().clamp_min(1e-30) * (1 - missed)).numpy()
    return Unfolding(name, side, hook, order.tolist(), weights, missed, np.array(explained), missed,
                     int(basis_hook.shape[1]), port if side == "read" else None)


def expand(graph: ChannelGraph, unfoldings: list[Unfolding] | Unfolding, *, n_features: int = 8) -> nx.DiGraph:
    """A copy of ``graph.nx`` with channels split into feature nodes and an error node.

    Write side: channel c keeps its node and ports; its outgoing routes leave from nodes
    ``"c#f{id}"`` (``kind="feature"``) and ``"c#error"`` (``kind="feature_error"``), each carrying
    the route's strengths times the feature's weight (the error node the error's weight plus the
    features beyond ``n_features``), with a ``kind="feature"`` edge from c to each. Read side:
    the routes into the unfolded port pass through feature nodes ``"port#f{id}"`` the same way.
    """
    g = graph.nx.copy()
    for u in [unfoldings] if isinstance(unfoldings, Unfolding) else unfoldings:
        kept = list(zip(u.features[:n_features], u.weights[:n_features], strict=True))
        rest = float(u.error_weight + u.weights[n_features:].sum())
        if u.side == "write":
            hub, edges = u.channel, [(a, b, d) for a, b, d in g.out_edges(u.channel, data=True) if d["kind"] == "route"]
        else:
            hub = port_name(u.channel, None if u.port in (None, "in") else u.port)
            edges = [(a, b, d) for a, b, d in g.in_edges(hub, data=True) if d["kind"] == "route"]
        nodes = [(f"{hub}#f{f}", w, "feature", f) for f, w in kept] + [(f"{hub}#error", rest, "feature_error", None)]
        for node, w, kind, f in nodes:
            g.add_node(node, kind=kind, channel=u.channel, feature=f, hook=u.hook, side=u.side, weight=float(w),
                       layer=g.nodes[u.channel].get("layer"), order=g.nodes[u.channel].get("order", 0))
            if u.side == "write":
                g.add_edge(hub, node, kind="feature")
            else:
                g.add_edge(node, hub, kind="feature")
        for a, b, d in edges:
            g.remove_edge(a, b)
            for node, w, _, _ in nodes:
                scaled = {k: (v * w if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                          for k, v in d.items()}
                if u.side == "write":
                    g.add_edge(node, b, **scaled)
                else:
                    g.add_edge(a, node, **scaled)
    return g
