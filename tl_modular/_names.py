"""The one grammar for names: channels, ports, units and hook points, and the order of the stream.

Every name tl_modular writes or reads back is formatted and parsed here, so the grammar lives in
one place::

    channel    embed | pos_embed | L{l}.H{h} | L{l}.MLP | L{l}.b_O
    port       L{l}.H{h}:{q|k|v} | L{l}.MLP | unembed        (a receiver of routes)
    neuron     L{l}.MLP.N{i}
    direction  {channel}:{q|k|v|in|write}.d{j}               (a direction of a read or write side)
    feature    sae:{hook}/F{f}                                (an SAE or transcoder feature)
    module     module:{i}                                     (a set of channels, labeled as one unit)

A head's *read path* is ``q``, ``k`` or ``v`` and an MLP's is ``in`` (the keys of a channel's read
sides); a *port* is the channel plus the path where routes arrive (``L1.H3:q``; an MLP is its own port).

Hook points are TransformerLens' own names, built with ``transformer_lens.utilities.get_act_name``
(imported on first use: importing TransformerLens takes seconds and ``import tl_modular`` does not).

>>> parse("L1.H3:q")
Name(kind='port', layer=1, head=3, path='q', index=None, hook=None)
>>> str(parse("L0.MLP.N12")), parse("L0.MLP.N12").channel
('L0.MLP.N12', 'L0.MLP')
>>> head_name(1, 3), mlp_name(0), port_name("L1.H3", "k"), neuron_name(0, 12)
('L1.H3', 'L0.MLP', 'L1.H3:k', 'L0.MLP.N12')
>>> direction_name("L1.H3", "write", 0), feature_name("blocks.0.hook_mlp_out", 17), module_name(2)
('L1.H3:write.d0', 'sae:blocks.0.hook_mlp_out/F17', 'module:2')
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "UNEMBED", "Name", "NameKind", "ReadPath", "act_name", "bias_name", "channel_order", "direction_name",
    "feature_name", "head_name", "hook_kind", "hook_layer", "is_residual", "layer_name", "mlp_name", "module_name",
    "neuron_name", "norm_scale_hook", "parse", "port_hook", "port_name", "split_port", "stream_index",
]

#: The logits' port: routes into it are direct logit attribution.
UNEMBED = "unembed"

NameKind = Literal["embed", "pos_embed", "head", "mlp", "bias", "port", "unembed", "neuron", "direction", "feature",
                   "module"]
ReadPath = Literal["q", "k", "v"]

_CHANNEL = r"L(?P<layer>\d+)\.(?:H(?P<head>\d+)|(?P<mlp>MLP)|(?P<bias>b_O))"
_PATTERN = re.compile(rf"{_CHANNEL}(?:\.N(?P<neuron>\d+)|:(?P<path>q|k|v|in|write)(?:\.d(?P<dir>\d+))?)?")
_FEATURE = re.compile(r"sae:(?P<hook>[^/\s]+)/F(?P<index>\d+)")
_MODULE = re.compile(r"module:(?P<index>\d+)")


@dataclass(frozen=True)
class Name:
    """A parsed name (see the module docs for the grammar); ``str(name)`` formats it back.

    Attributes:
        kind: ``"embed"``, ``"pos_embed"``, ``"head"``, ``"mlp"``, ``"bias"`` (channels), ``"port"``
            (a head's ``:q/:k/:v``), ``"unembed"``, ``"neuron"``, ``"direction"``, ``"feature"`` or
            ``"module"``.
        layer: Block index (``None`` for the embeddings, ``unembed``, features and modules).
        head: Head index of a head's channel, port or direction.
        path: A port's read path; a direction's side (``q``, ``k``, ``v``, ``in`` or ``write``).
        index: A neuron's index in ``d_mlp``, a direction's index in its side, a feature's index in
            its SAE or a module's index.
        hook: The hook point a feature's SAE reads.
    """

    kind: NameKind
    layer: int | None = None
    head: int | None = None
    path: str | None = None
    index: int | None = None
    hook: str | None = None

    @property
    def channel(self) -> str:
        """The channel the name belongs to (``unembed`` for the logits' port).

        Raises:
            ValueError: a feature or a module, which belong to no single channel.
        """
        if self.kind in ("embed", "pos_embed", "unembed"):
            return self.kind
        if self.kind in ("feature", "module"):
            raise ValueError(f"{self} belongs to no single channel: only channel, port, neuron and direction "
                             "names have one")
        if self.head is not None:
            return head_name(self.layer, self.head)
        return bias_name(self.layer) if self.kind == "bias" else mlp_name(self.layer)

    def __str__(self) -> str:
        if self.kind == "port":
            return port_name(self.channel, self.path)
        if self.kind == "neuron":
            return neuron_name(self.layer, self.index)
        if self.kind == "direction":
            return direction_name(self.channel, self.path, self.index)
        if self.kind == "feature":
            return feature_name(self.hook, self.index)
        if self.kind == "module":
            return module_name(self.index)
        return self.channel


@functools.lru_cache(maxsize=65536)   # names repeat in hot loops (route validity); Name is frozen
def parse(name: str) -> Name:
    """Parse a channel, port, neuron, direction, feature or module name.

    Raises:
        ValueError: ``name`` follows none of the forms (the message lists them).

    >>> parse("L2.MLP")
    Name(kind='mlp', layer=2, head=None, path=None, index=None, hook=None)
    >>> parse("L1.H3:write.d0").kind, parse("sae:blocks.0.hook_mlp_out/F17").hook, parse("module:3").index
    ('direction', 'blocks.0.hook_mlp_out', 3)
    """
    if name in ("embed", "pos_embed", UNEMBED):
        return Name(kind=name)
    m = _PATTERN.fullmatch(name) if isinstance(name, str) else None
    if m is None and isinstance(name, str):
        if f := _FEATURE.fullmatch(name):
            return Name(kind="feature", index=int(f["index"]), hook=f["hook"])
        if f := _MODULE.fullmatch(name):
            return Name(kind="module", index=int(f["index"]))
    if m is None:
        raise ValueError(f"{name!r} is not a tl_modular name: expected a channel (embed, pos_embed, L1.H3, L1.MLP, "
                         "L1.b_O), a port (L1.H3:q, unembed), a neuron (L1.MLP.N12), a direction (L1.H3:q.d0), "
                         "a feature (sae:blocks.0.hook_mlp_out/F17) or a module (module:0)")
    layer = int(m["layer"])
    head = int(m["head"]) if m["head"] is not None else None
    kind: NameKind = "head" if head is not None else "mlp" if m["mlp"] else "bias"
    if m["neuron"] is not None:
        if kind != "mlp":
            raise ValueError(f"{name!r}: only MLPs have neurons (L1.MLP.N12)")
        return Name(kind="neuron", layer=layer, index=int(m["neuron"]))
    path = m["path"]
    if path is None:
        return Name(kind=kind, layer=layer, head=head)
    if m["dir"] is not None:
        return Name(kind="direction", layer=layer, head=head, path=path, index=int(m["dir"]))
    if kind != "head" or path not in ("q", "k", "v"):
        raise ValueError(f"{name!r} is not a port: heads have ports ':q', ':k', ':v'; an MLP's port is its "
                         "channel name; the logits' port is 'unembed'")
    return Name(kind="port", layer=layer, head=head, path=path)


def head_name(layer: int, head: int) -> str:
    """``L{layer}.H{head}``."""
    return f"L{layer}.H{head}"


def mlp_name(layer: int) -> str:
    """``L{layer}.MLP``."""
    return f"L{layer}.MLP"


def bias_name(layer: int) -> str:
    """``L{layer}.b_O``: the attention output bias, a channel of its own (shared by the heads)."""
    return f"L{layer}.b_O"


def neuron_name(layer: int, index: int) -> str:
    """``L{layer}.MLP.N{index}``."""
    return f"{mlp_name(layer)}.N{index}"


def port_name(channel: str, path: str | None = None) -> str:
    """A head's port ``L1.H3:q`` (``path`` q, k or v); an MLP's port (no path) is its channel name."""
    return f"{channel}:{path}" if path else channel


def direction_name(channel: str, side: str, index: int) -> str:
    """``{channel}:{side}.d{index}``: direction ``index`` of a read side (``q``, ``k``, ``v``, ``in``) or
    the ``write`` side of ``channel``."""
    return f"{channel}:{side}.d{index}"


def feature_name(hook: str, index: int) -> str:
    """``sae:{hook}/F{index}``: feature ``index`` of the SAE (or transcoder) reading ``hook``."""
    return f"sae:{hook}/F{index}"


def module_name(index: int) -> str:
    """``module:{index}``: a module (a set of channels) labeled as one unit."""
    return f"module:{index}"


def layer_name(layer: int) -> str:
    """``L{layer}``: a block on its own (the folder of per-layer artifacts)."""
    return f"L{layer}"


def split_port(port: str) -> tuple[str, str]:
    """``(channel, path)`` of a port; the path is ``""`` for an MLP and for ``unembed``.

    >>> split_port("L1.H3:k"), split_port("L0.MLP")
    (('L1.H3', 'k'), ('L0.MLP', ''))
    """
    channel, _, path = port.partition(":")
    return channel, path


# --- hook points -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)    # a model has few hook names; patching asks for them per route
def act_name(name: str, layer: int | None = None, sub: str | None = None) -> str:
    """TransformerLens' hook name: ``act_name("resid_pre", 1)`` → ``blocks.1.hook_resid_pre``,
    ``act_name("q", 0)`` → ``blocks.0.attn.hook_q``, ``act_name("normalized", 0, "ln1")`` →
    ``blocks.0.ln1.hook_normalized`` (``transformer_lens.utilities.get_act_name``)."""
    from transformer_lens.utilities import get_act_name

    return get_act_name(name, layer, sub)


def norm_scale_hook(normalized_hook: str) -> str:
    """The scale hook of the norm whose output is ``normalized_hook``
    (``blocks.1.ln2.hook_normalized`` → ``blocks.1.ln2.hook_scale``).

    >>> norm_scale_hook("blocks.1.ln2.hook_normalized")
    'blocks.1.ln2.hook_scale'
    """
    return f"{normalized_hook.rsplit('.', 1)[0]}.hook_scale"


def hook_kind(hook_name: str) -> str:
    """What a hook point holds, by TransformerLens' short name (``get_act_name``'s first argument).

    >>> hook_kind("blocks.0.attn.hook_z"), hook_kind("blocks.1.ln2.hook_normalized"), hook_kind("hook_embed")
    ('z', 'normalized', 'embed')
    """
    return hook_name.rsplit(".", 1)[-1].removeprefix("hook_")


def is_residual(hook_name: str) -> bool:
    """Whether the hook reads the residual stream itself (``resid_pre``, ``resid_mid``, ``resid_post``)."""
    return hook_kind(hook_name) in ("resid_pre", "resid_mid", "resid_post")


def hook_layer(hook_name: str) -> int | None:
    """The block a hook point belongs to (``blocks.3.attn.hook_z`` → 3); ``None`` outside the blocks.

    >>> hook_layer("blocks.3.attn.hook_z"), hook_layer("hook_embed")
    (3, None)
    """
    parts = hook_name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


class _PortReader(Protocol):
    kind: str
    layer: int | None
    head: int | None
    kv_head: int | None


def port_hook(channel: _PortReader, path: str) -> tuple[str, int | None]:
    """The hook where ``channel`` reads through ``path``, and the head index into it (else ``None``).

    A head's ``q`` reads ``blocks.{l}.hook_q_input[..., head, :]``; its ``k`` and ``v`` read their
    key/value group's slot (``kv_head``, grouped-query attention); an MLP (``path`` ``""`` or ``"in"``)
    reads ``blocks.{l}.hook_mlp_in``. Those hooks exist only while the model runs with split inputs
    (:func:`tl_modular.patching.split_inputs`).
    """
    if channel.kind == "head" and path in ("q", "k", "v"):
        return act_name(f"{path}_input", channel.layer), channel.head if path == "q" else channel.kv_head
    if channel.kind == "mlp" and path in ("", "in"):
        return act_name("mlp_in", channel.layer), None
    raise ValueError(f"a {channel.kind} channel has no read path {path!r}: heads read through 'q', 'k', 'v'; "
                     "an MLP through its input")


# --- the order of the residual stream --------------------------------------------------------------

_RESID = {"hook_resid_pre": 0, "hook_resid_mid": 1, "hook_resid_post": 2}


def stream_index(resid_hook: str) -> int:
    """Position of a residual hook in the stream: ``resid_pre`` of layer ``l`` is ``2l``, ``resid_mid``
    ``2l + 1``, ``resid_post`` ``2l + 2``; ``hook_pos_embed`` (read by shortformer heads) is 0.

    >>> stream_index("blocks.1.hook_resid_mid")
    3
    """
    if resid_hook == "hook_pos_embed":
        return 0
    parts = resid_hook.split(".")
    return 2 * int(parts[1]) + _RESID[parts[2]]


def channel_order(name: str, reading: bool = False) -> float:
    """Stream order from a name alone (sequential blocks): embeddings ``-1``; layer ``l``'s heads read
    at ``2l`` and write at ``2l + 0.5``, its MLP reads at ``2l + 1`` and writes at ``2l + 1.5``;
    ``unembed`` last.

    >>> channel_order("L1.H0", reading=True), channel_order("L1.MLP"), channel_order("unembed")
    (2.0, 3.5, inf)
    """
    if name == UNEMBED:
        return float("inf")
    if name in ("embed", "pos_embed"):
        return -1.0
    n = parse(name)
    return 2.0 * n.layer + (1.0 if n.kind == "mlp" else 0.0) + (0.0 if reading else 0.5)
