"""The hooks behind ``Compression.applied``: each channel restricted to its subspaces.

Read sides act where the channel reads its own input: a head's ``hook_q`` / ``hook_k`` /
``hook_v`` and an MLP's ``hook_pre`` (and ``hook_pre_linear``), shifted by the discarded part
of the normalized input mapped through the port (``q' = q - disc(ŷ) @ diag(w) W_Q``), so
every other reader of the layer's input is untouched and LayerNorm stays exact. Write sides act
on ``hook_attn_out`` (each head's write ``z_h W_O[h]`` projected) and ``hook_mlp_out``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from tl_modular._names import act_name
from tl_modular.compression.statistics import read_map
from tl_modular.segmentation import Channel, segment

if TYPE_CHECKING:      # annotations only: compression.py imports this module
    from tl_modular.compression import ChannelCompression, Compression, Side


def restriction_hooks(model: Any, comp: Compression, names: list[str], *, restrict_first: bool,
                      override: dict[tuple[str, str], tuple[torch.Tensor, ...]] | None = None) -> list:
    """The hooks restricting ``names``; ``override[(channel, side_key)] = (mean, encoder, decoder)``
    replaces a side's tensors (trainable ones, for ``Compression.refined``)."""
    channels = segment(model)
    disc = _Discarded(model, override or {})
    first = partial(_first_mask, restrict_first=restrict_first)
    captured: dict[str, torch.Tensor] = {}
    reads: dict[tuple[str, int | None], list] = {}      # (port hook, head index) -> [(input hook, disc, map)]
    head_writes: dict[int, list] = {}                   # layer -> [(head, W_O, disc)]
    mlp_writes: list = []
    for name in names:
        c = channels[name]
        if c.kind == "head":
            _add_head(c, comp[name], disc, reads, head_writes)
        else:
            mlp_writes.append(_add_mlp(c, comp[name], disc, reads, first))
    hooks = [(h, _capture(captured, h)) for h in sorted({channels[n].input_hook for n in names})] + mlp_writes
    hooks += [(hook, _shift_port(captured, index, pairs, first)) for (hook, index), pairs in reads.items()]
    for layer, writes in head_writes.items():
        hooks += _attn_out_hooks(captured, layer, writes, first)
    return hooks


class _Discarded:
    """``disc(x) = (x - mean) - (x - mean) E Dᵀ``: what a side drops of ``x``, in the model's dtype and
    device; ``override`` replaces a side's ``(mean, encoder, decoder)``."""

    def __init__(self, model: Any, override: dict[tuple[str, str], tuple[torch.Tensor, ...]]) -> None:
        self.dtype = next(model.parameters()).dtype
        self.device = model.cfg.device
        self.override = override

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype)

    def __call__(self, side: Side, key: tuple[str, str]) -> Callable[[torch.Tensor], torch.Tensor]:
        if key in self.override:
            mu, enc, dec = (self.cast(t) for t in self.override[key])
        else:
            mu, enc, dec = self.cast(side.mean), self.cast(side.encoder), self.cast(side.decoder)
        return lambda x: (x - mu) - ((x - mu) @ enc) @ dec.T


def _add_head(c: Channel, cc: ChannelCompression, disc: _Discarded, reads: dict, head_writes: dict) -> None:
    """Register a head's q / k / v read shifts and its share of the layer's attention write."""
    for p in "qkv":
        index = c.head if p == "q" else c.kv_head
        reads.setdefault((act_name(p, c.layer), index), []).append(
            (c.input_hook, disc(cc.read[p], (c.name, f"read:{p}")), disc.cast(read_map(c, p))))
    head_writes.setdefault(c.layer, []).append((c.head, disc.cast(c.weights["W_O"].detach()),
                                                disc(cc.write, (c.name, "write"))))


def _add_mlp(c: Channel, cc: ChannelCompression, disc: _Discarded, reads: dict, first: Callable
             ) -> tuple[str, Callable]:
    """Register an MLP's read shifts (gate and linear branch when gated); its write hook."""
    read = disc(cc.read["in"], (c.name, "read:in"))
    gated = "W_gate" in c.weights
    reads.setdefault((act_name("pre", c.layer), None), []).append(
        (c.input_hook, read, disc.cast(read_map(c, "gate" if gated else "in"))))
    if gated:
        reads.setdefault((act_name("pre_linear", c.layer), None), []).append(
            (c.input_hook, read, disc.cast(read_map(c, "in"))))
    return act_name("mlp_out", c.layer), _write_hook(disc(cc.write, (c.name, "write")), first)


def _first_mask(act: torch.Tensor, *, restrict_first: bool) -> torch.Tensor:
    """1 at every position (0 at position 0 unless ``restrict_first``), shaped to broadcast on ``act``."""
    mask = torch.ones(act.shape[1], device=act.device, dtype=act.dtype)
    if not restrict_first:
        mask[0] = 0
    return mask.view(1, -1, *([1] * (act.ndim - 2)))


def _capture(captured: dict[str, torch.Tensor], name: str) -> Callable:
    def fn(act: torch.Tensor, hook: Any) -> None:
        captured[name] = act
    return fn


def _shift_port(captured: dict[str, torch.Tensor], index: int | None, pairs: list, first: Callable) -> Callable:
    """Subtract disc(ŷ) @ map for each (input hook, disc, map) pair at head/unit ``index``."""
    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        for inp, disc, w in pairs:
            delta = disc(captured[inp]) @ w
            if index is None:
                act -= delta * first(act)
            else:
                act[:, :, index] -= delta * first(delta)
        return act
    return fn


def _attn_out_hooks(captured: dict[str, torch.Tensor], layer: int, writes: list, first: Callable) -> list:
    """Capture the layer's ``z``, then subtract each restricted head's discarded write from ``attn_out``."""
    z_name = act_name("z", layer)

    def attn_out(act: torch.Tensor, hook: Any) -> torch.Tensor:
        z = captured[z_name]
        delta = sum(disc(z[:, :, h] @ w_o) for h, w_o, disc in writes)
        return act - delta * first(act)
    return [(z_name, _capture(captured, z_name)), (act_name("attn_out", layer), attn_out)]


def _write_hook(disc: Callable, first_mask: Callable) -> Callable:
    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act - disc(act) * first_mask(act)
    return fn
