"""Channel segmentation: a transformer cut into the parts that read and write its residual stream.

A *channel* is one additive writer into the residual stream: the token embedding, the
positional embedding, every attention head, every MLP, and each layer's attention output
bias (shared by the heads, so it is a channel of its own). Their writes sum exactly to the
final residual stream (the input of ``ln_final``), which is what makes every later stage —
compression, graphs, circuits, labels — a statement about the whole model.

>>> import tl_modular as tlm
>>> channels = tlm.segment(model)                       # doctest: +SKIP
>>> _, cache = model.run_with_cache(tokens, names_filter=channels.names_filter)  # doctest: +SKIP
>>> parts = channels.contributions(cache)               # doctest: +SKIP
>>> torch.allclose(parts.sum(0), channels.residual(cache), atol=1e-5)  # doctest: +SKIP
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from jaxtyping import Float

from tl_modular._models import check_supported
from tl_modular._names import act_name, bias_name, head_name, mlp_name

__all__ = ["Channel", "ChannelKind", "ChannelSet", "segment"]

ChannelKind = Literal["embed", "pos_embed", "head", "mlp", "bias"]


@dataclass(frozen=True)
class Channel:
    """One additive writer into the residual stream.

    Attributes:
        name: ``embed``, ``pos_embed``, ``L{l}.H{h}``, ``L{l}.MLP`` or ``L{l}.b_O``.
        kind: ``"embed"``, ``"pos_embed"``, ``"head"``, ``"mlp"`` or ``"bias"``.
        layer: Block index, ``None`` for the embeddings.
        head: Head index for heads, else ``None``.
        kv_head: For grouped-query attention, the key/value group the head reads its keys
            and values through (``head // (n_heads // n_key_value_heads)``); else equal to
            ``head`` for heads and ``None`` otherwise.
        reads: Residual-stream hook points the channel reads (``blocks.{l}.hook_resid_pre``
            or ``hook_resid_mid``; shortformer heads also read ``hook_pos_embed`` on their
            query and key paths). Empty for embeddings and biases.
        input_hook: Hook point holding the channel's input after normalization
            (``blocks.{l}.ln1.hook_normalized`` ...), or the residual hook itself when the
            model has no normalization. ``None`` when the channel reads nothing.
        source_hook: Hook point whose activation yields the write: ``hook_z`` (times this
            head's ``W_O``), ``hook_mlp_out``, ``hook_embed``, ``hook_pos_embed``; ``None``
            for bias channels, whose write is a constant.
        writes: Residual-stream hook point in which the write first appears.
    """

    name: str
    kind: ChannelKind
    layer: int | None = None
    head: int | None = None
    kv_head: int | None = None
    reads: tuple[str, ...] = ()
    input_hook: str | None = None
    source_hook: str | None = None
    writes: str = "blocks.0.hook_resid_pre"
    _model: Any = field(default=None, repr=False, compare=False)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The channel's parameters under TransformerLens' names, read live from the model.

        Heads get ``W_Q, W_K, W_V, W_O`` (``[d_model, d_head]`` / ``[d_head, d_model]``) and
        their biases; MLPs ``W_in, b_in, W_out, b_out`` (and ``W_gate`` when gated); the
        normalization they read through as ``ln1.w`` / ``ln2.w`` (and ``.b``) when it has
        parameters; embeddings ``W_E`` / ``W_pos``; bias channels ``b_O``. Tensors follow the
        model's current device and dtype (they are not copies).
        """
        model = self._model
        if self.kind == "embed":
            return {"W_E": model.W_E}
        if self.kind == "pos_embed":
            return {"W_pos": model.pos_embed.W_pos}
        block = model.blocks[self.layer]
        if self.kind == "bias":
            return {"b_O": block.attn.b_O}
        if self.kind == "head":
            attn, h = block.attn, self.head
            out = {n: getattr(attn, n)[h] for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")}
            out.update(_norm_weights(block, "ln1"))
            return out
        mlp = block.mlp
        out = {n: getattr(mlp, n) for n in ("W_in", "b_in", "W_out", "b_out")}
        gate = getattr(mlp, "W_gate", None)  # a TransformerBridge MLP answers None
        if isinstance(gate, torch.Tensor):
            out["W_gate"] = gate
        out.update(_norm_weights(block, "ln2"))
        return out


def _norm_weights(block: Any, ln: str) -> dict[str, torch.Tensor]:
    norm = getattr(block, ln, None)
    params = {p: getattr(norm, p, None) for p in ("w", "b")}
    return {f"{ln}.{p}": t for p, t in params.items() if isinstance(t, torch.Tensor)}


class ChannelSet(Sequence[Channel]):
    """The channels of one model, in residual-stream order, with their exact decomposition.

    Index by name (``channels["L3.H7"]``) or position. Build it with :func:`segment`.
    """

    def __init__(self, channels: Sequence[Channel], model: Any, final_hook: str) -> None:
        self._channels = tuple(channels)
        self._index = {c.name: i for i, c in enumerate(self._channels)}
        self.model = model
        #: Hook point of the final residual stream (the input of ``ln_final``).
        self.final_hook = final_hook
        hooks = {c.source_hook for c in self._channels if c.source_hook is not None}
        #: Every hook point :meth:`contributions` and :meth:`residual` read.
        self.hook_names: tuple[str, ...] = tuple(sorted(hooks | {final_hook}))
        self._hook_set = frozenset(self.hook_names)

    # --- container protocol -------------------------------------------------------------
    @overload
    def __getitem__(self, key: int | str) -> Channel: ...
    @overload
    def __getitem__(self, key: slice) -> Sequence[Channel]: ...
    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return self._channels[self._index[key]]
            except KeyError:
                raise KeyError(f"no channel named {key!r}; channels are named like "
                               f"{', '.join(self.names[:4])}, ... (see ChannelSet.names)") from None
        return self._channels[key]

    def __len__(self) -> int:
        return len(self._channels)

    def __iter__(self) -> Iterator[Channel]:
        return iter(self._channels)

    def __contains__(self, key: object) -> bool:
        return key in self._index if isinstance(key, str) else key in self._channels

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for c in self._channels:
            counts[c.kind] = counts.get(c.kind, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in counts.items())
        return f"ChannelSet({len(self)} channels: {parts})"

    @property
    def names(self) -> list[str]:
        """Channel names in residual-stream order."""
        return [c.name for c in self._channels]

    def index(self, name: str) -> int:  # type: ignore[override]
        """Position of the channel called ``name`` (the row in :meth:`contributions`)."""
        return self._index[self[name].name]

    def of_kind(self, *kinds: ChannelKind) -> list[Channel]:
        """Channels of the given kinds, e.g. ``channels.of_kind("head", "mlp")``."""
        return [c for c in self._channels if c.kind in kinds]

    def in_layer(self, layer: int) -> list[Channel]:
        """Channels of one block (heads, MLP and the attention bias)."""
        layers = sorted({c.layer for c in self._channels if c.layer is not None})
        if layer not in layers:
            raise ValueError(f"no layer {layer}: this model's blocks are {layers[0]}..{layers[-1]}" if layers
                             else f"no layer {layer}: this channel set holds no blocks")
        return [c for c in self._channels if c.layer == layer]

    # --- caches ----------------------------------------------------------------------------
    def names_filter(self, name: str) -> bool:
        """``names_filter`` for ``run_with_cache``: caches exactly what :meth:`contributions` needs."""
        return name in self._hook_set

    def run_with_cache(self, tokens: Any, **kwargs: Any) -> tuple[Any, Any]:
        """``model.run_with_cache`` with this set's :meth:`names_filter`; hooks are removed after.

        >>> logits, cache = channels.run_with_cache(tokens)  # doctest: +SKIP
        """
        from tl_modular._hooks import run_with_cache

        kwargs.setdefault("names_filter", self.names_filter)
        return run_with_cache(self.model, tokens, **kwargs)

    def residual(self, cache: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "... d_model"]:
        """The final residual stream (before ``ln_final``) from a cache."""
        return _get(cache, self.final_hook)

    def contributions(
        self,
        cache: Mapping[str, torch.Tensor],
        channels: Sequence[str] | None = None,
    ) -> Float[torch.Tensor, "channel ... d_model"]:
        """Every channel's write into the residual stream.

        Args:
            cache: An ``ActivationCache`` (or dict) holding at least :attr:`hook_names`; obtain
                it with ``model.run_with_cache(tokens, names_filter=channels.names_filter)``.
                Caches with or without a batch dimension work.
            channels: Names of the channels to return, in that order; all by default.

        Returns:
            ``[channel, *batch_and_pos, d_model]`` in the cache's dtype and device. With all
            channels, the rows sum to :meth:`residual` within floating-point rounding.

        >>> parts = channels.contributions(cache)                        # doctest: +SKIP
        >>> parts[channels.index("L1.H3")]                               # doctest: +SKIP
        """
        chosen = [self[n] for n in channels] if channels is not None else list(self._channels)
        ref = self.residual(cache)
        out = torch.empty((len(chosen), *ref.shape), dtype=ref.dtype, device=ref.device)
        head_rows: dict[int, list[tuple[int, int]]] = {}
        for row, c in enumerate(chosen):
            if c.kind == "head":
                head_rows.setdefault(c.layer, []).append((row, c.head))
            elif c.kind == "bias":
                out[row] = c.weights["b_O"].detach().to(ref)
            else:
                out[row] = _get(cache, c.source_hook)
        for layer, rows in head_rows.items():
            # One einsum per layer over the requested heads: z_h @ W_O[h].
            heads = [h for _, h in rows]
            z = _get(cache, act_name("z", layer))[..., heads, :]
            w_o = self.model.blocks[layer].attn.W_O.detach()[heads].to(z)
            result = torch.einsum("...hd,hdm->h...m", z, w_o)
            out[[r for r, _ in rows]] = result
        return out


def _get(cache: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return cache[name]
    except KeyError:
        raise KeyError(
            f"the cache has no activation {name!r}; run the model with "
            "run_with_cache(tokens, names_filter=channels.names_filter) so it holds every hook "
            "the channel decomposition needs"
        ) from None


def segment(model: Any) -> ChannelSet:
    """Cut a TransformerLens model into channels.

    Args:
        model: A ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.

    Returns:
        A :class:`ChannelSet`: ``embed``, ``pos_embed`` (when positions are added to the
        residual stream), then per layer the heads ``L{l}.H{h}``, the attention bias
        ``L{l}.b_O`` and the MLP ``L{l}.MLP``.

    Raises:
        TypeError: ``model`` is not a TransformerLens model.
        UnsupportedModelError: the architecture cannot be cut exactly (mixture of experts,
            encoders, post-norm blocks, ...).

    >>> channels = tlm.segment(model)        # doctest: +SKIP
    >>> channels["L0.H1"].weights["W_O"].shape  # doctest: +SKIP
    torch.Size([64, 768])
    """
    check_supported(model)
    cfg = model.cfg
    has_norm = cfg.normalization_type is not None
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    group = cfg.n_heads // n_kv
    shortformer = cfg.positional_embedding_type == "shortformer"
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    attn_only = bool(cfg.attn_only)

    chans: list[Channel] = [Channel("embed", "embed", source_hook="hook_embed", _model=model)]
    if cfg.positional_embedding_type == "standard":
        chans.append(Channel("pos_embed", "pos_embed", source_hook="hook_pos_embed", _model=model))
    # Shortformer positions are read by the query/key paths but never added to the residual
    # stream, so they are an input of the heads rather than a channel.
    for l in range(cfg.n_layers):
        pre, mid, post = (act_name(f"resid_{s}", l) for s in ("pre", "mid", "post"))
        attn_writes = post if (attn_only or parallel) else mid
        head_reads = (pre, "hook_pos_embed") if shortformer else (pre,)
        ln1 = act_name("normalized", l, "ln1") if has_norm else pre
        for h in range(cfg.n_heads):
            chans.append(Channel(head_name(l, h), "head", l, h, h // group, head_reads, ln1,
                                 act_name("z", l), attn_writes, model))
        chans.append(Channel(bias_name(l), "bias", l, writes=attn_writes, _model=model))
        if not attn_only:
            mlp_reads = pre if parallel else mid
            ln2 = act_name("normalized", l, "ln2") if has_norm else mlp_reads
            chans.append(Channel(mlp_name(l), "mlp", l, None, None, (mlp_reads,), ln2,
                                 act_name("mlp_out", l), post, model))
    return ChannelSet(chans, model, act_name("resid_post", cfg.n_layers - 1))
