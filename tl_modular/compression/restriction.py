"""The hooks behind ``Compression.applied``: each channel restricted to its subspaces.

Read sides act where the channel reads its own input: a head's ``hook_q`` / ``hook_k`` /
``hook_v`` and an MLP's ``hook_pre`` (and ``hook_pre_linear``), shifted by the discarded part
of the normalized input mapped through the port (``q' = q - disc(ŷ) @ diag(w) W_Q``), so
every other reader of the layer's input is untouched and LayerNorm stays exact. Write sides act
on ``hook_attn_out`` (each head's write ``z_h W_O[h]`` projected) and ``hook_mlp_out``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tl_modular._names import act_name
from tl_modular.compression.statistics import read_map
from tl_modular.segmentation import segment

if TYPE_CHECKING:      # annotations only: compression.py imports this module
    from tl_modular.compression import Compression, Side


def restriction_hooks(model: Any, comp: Compression, names: list[str], *, restrict_first: bool,
                      override: dict[tuple[str, str], tuple[torch.Tensor, ...]] | None = None) -> list:
    """The hooks restricting ``names``; ``override[(channel, side_key)] = (mean, encoder, decoder)``
    replaces a side's tensors (trainable ones, for ``Compression.refined``)."""
    channels = segment(model)
    override = override or {}
    dtype = next(model.parameters()).dtype
    device = model.cfg.device
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    captured: dict[str, torch.Tensor] = {}
    hooks: list = []
    inputs: set[str] = set()

    def first_mask(act: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(act.shape[1], device=act.device, dtype=act.dtype)
        if not restrict_first:
            mask[0] = 0
        return mask.view(1, -1, *([1] * (act.ndim - 2)))

    def capture(name: str):
        def fn(act: torch.Tensor, hook: Any) -> None:
            captured[name] = act
        return fn

    def disc_fn(side: Side, key: tuple[str, str]):
        if key in override:
            mu, enc, dec = (cast(t) for t in override[key])
        else:
            mu, enc, dec = cast(side.mean), cast(side.encoder), cast(side.decoder)
        return lambda x: (x - mu) - ((x - mu) @ enc) @ dec.T

    def shift_port(index: int, pairs: list):
        """Subtract disc(ŷ) @ map for each (input hook, disc, map) pair at head/unit ``index``."""
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act = act.clone()
            for inp, disc, w in pairs:
                delta = disc(captured[inp]) @ w
                if index is None:
                    act -= delta * first_mask(act)
                else:
                    act[:, :, index] -= delta * first_mask(delta)
            return act
        return fn

    by_hook: dict[tuple[str, int | None], list] = {}
    head_writes: dict[int, list] = {}
    for name in names:
        c, cc = channels[name], comp[name]
        inputs.add(c.input_hook)
        if c.kind == "head":
            for p in "qkv":
                index = c.head if p == "q" else c.kv_head
                key = (act_name(p, c.layer), index)
                by_hook.setdefault(key, []).append((c.input_hook, disc_fn(cc.read[p], (name, f"read:{p}")),
                                                    cast(read_map(c, p))))
            head_writes.setdefault(c.layer, []).append((c.head, cast(c.weights["W_O"].detach()),
                                                        disc_fn(cc.write, (name, "write"))))
        else:
            side = cc.read["in"]
            disc = disc_fn(side, (name, "read:in"))
            by_hook.setdefault((act_name("pre", c.layer), None), []).append(
                (c.input_hook, disc, cast(read_map(c, "gate" if "W_gate" in c.weights else "in"))))
            if "W_gate" in c.weights:
                by_hook.setdefault((act_name("pre_linear", c.layer), None), []).append(
                    (c.input_hook, disc, cast(read_map(c, "in"))))
            write = disc_fn(cc.write, (name, "write"))
            hooks.append((act_name("mlp_out", c.layer), _write_hook(write, first_mask)))
    hooks = [(h, capture(h)) for h in sorted(inputs)] + hooks
    for (hook, index), pairs in by_hook.items():
        hooks.append((hook, shift_port(index, pairs)))
    for layer, writes in head_writes.items():
        z_name = act_name("z", layer)
        hooks.append((z_name, capture(z_name)))

        def attn_out(act: torch.Tensor, hook: Any, writes: list = writes, z_name: str = z_name) -> torch.Tensor:
            z = captured[z_name]
            delta = sum(disc(z[:, :, h] @ w_o) for h, w_o, disc in writes)
            return act - delta * first_mask(act)
        hooks.append((act_name("attn_out", layer), attn_out))
    return hooks


def _write_hook(disc, first_mask):
    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act - disc(act) * first_mask(act)
    return fn
