"""Linear read-outs of an SAE's hook: which vector in the hook's coordinates a unit reads.

A unit u (an MLP neuron, a direction of a channel's read subspace) reads its channel's
normalized input ŷ through a vector v (``ŷ · v``; a neuron's v is ``diag(w_ln) W_in[:, i]``).
An SAE may sit on ŷ itself (``ln2.hook_normalized``) or on the residual hook x the channel
normalizes: with LayerNorm ``ŷ = P_c x / σ`` (``P_c`` centering, σ the token's scale), so the
unit reads x through ``P_c v`` times ``1/σ`` per token — exact, since ``P_c`` is symmetric and σ
is one number per token. RMSNorm drops ``P_c``; a model without normalization reads x directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from tl_modular._names import direction_name, mlp_name, neuron_name, norm_scale_hook
from tl_modular.segmentation import Channel, segment

if TYPE_CHECKING:
    from tl_modular.compression import Compression


@dataclass
class Readers:
    """Units reading one hook: ``names[i]`` reads ``vectors[:, i]`` (times ``1/σ`` when ``scale_hook``)."""

    hook: str
    names: list[str]
    vectors: Float[torch.Tensor, "d_in n_units"]
    scale_hook: str | None = None

    def __len__(self) -> int:
        return len(self.names)


def _ln_kind(model: object) -> str | None:
    return getattr(model.cfg, "normalization_type", None)


def to_hook(model: object, channel: Channel, vectors: torch.Tensor, hook: str) -> tuple[torch.Tensor, str | None]:
    """Map read vectors of ``channel`` (its normalized-input coordinates) onto ``hook``."""
    if hook == channel.input_hook:
        return vectors, None
    if hook not in channel.reads:
        raise ValueError(f"{channel.name} reads {list(channel.reads)} (normalized at {channel.input_hook}); "
                         f"an SAE at {hook!r} is not on its input: attach one at one of those hooks")
    kind = _ln_kind(model)
    if kind is None:
        return vectors, None
    if kind in ("LN", "LNPre"):
        vectors = vectors - vectors.mean(0, keepdim=True)  # P_c v
    return vectors, norm_scale_hook(channel.input_hook)


def neuron_readers(model: object, layer: int, hook: str) -> Readers:
    """Every neuron of MLP ``layer`` as a reader of ``hook`` (its pre-activation, bias left out)."""
    channels = segment(model)
    c = channels[mlp_name(layer)]
    w = c.weights
    v = w["W_in"].detach()
    if "ln2.w" in w:
        v = w["ln2.w"].detach()[:, None] * v
    vectors, scale = to_hook(model, c, v, hook)
    return Readers(hook, [neuron_name(layer, i) for i in range(v.shape[1])], vectors, scale)


def subspace_readers(model: object, comp: Compression, name: str, hook: str, *, ports: tuple[str, ...] | None = None
                     ) -> Readers:
    """The directions of ``name``'s read subspaces (one reader per basis vector, per port)."""
    channels = segment(model)
    c = channels[name]
    cc = comp[name]
    names, cols = [], []
    for port, side in cc.read.items():
        if ports is not None and port not in ports:
            continue
        basis = side.basis.detach().to(torch.float32)
        names += [direction_name(name, port, i) for i in range(basis.shape[1])]
        cols.append(basis)
    if not cols:
        raise ValueError(f"{name} has no read side among ports {ports}")
    vectors, scale = to_hook(model, c, torch.cat(cols, 1), hook)
    return Readers(hook, names, vectors, scale)


def readers_for(model: object, hook: str, comp: Compression | None = None) -> list[Readers]:
    """Every unit reading ``hook``: neurons of MLPs that read it and, with ``comp``, the read
    directions of every channel that reads it."""
    groups = []
    for c in segment(model):
        if not c.reads or (hook not in c.reads and hook != c.input_hook):
            continue
        if c.kind == "mlp" and "W_gate" not in c.weights:
            groups.append(neuron_readers(model, c.layer, hook))
        if comp is not None and c.name in comp:
            groups.append(subspace_readers(model, comp, c.name, hook))
    if not groups:
        raise ValueError(f"no unit reads {hook!r}: attach SAEs where channels read (hook_resid_pre, "
                         "hook_resid_mid or ln*.hook_normalized)")
    return groups
