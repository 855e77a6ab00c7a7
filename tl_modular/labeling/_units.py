"""What gets labeled: a :class:`Unit` is any scalar read-out of a TransformerLens cache.

A unit says which hooks it needs and how to turn their activations into one number per token.
Activations keep their sign (a read direction fires both ways), so evidence can show both tails.

>>> units = neurons(model, 0, indices=[3, 17])            # doctest: +SKIP
>>> units[0].read(cache, model).shape                     # doctest: +SKIP
torch.Size([batch, pos])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float

from tl_modular._names import (
    Name,
    act_name,
    direction_name,
    feature_name,
    hook_kind,
    mlp_name,
    module_name,
    neuron_name,
    parse,
)
from tl_modular.segmentation import Channel, ChannelSet, segment

if TYPE_CHECKING:
    from sae_lens import SAE

    from tl_modular.compression import Compression
    from tl_modular.graph import ChannelGraph

Reader = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]

#: What a unit is; ``"custom"`` for a unit you build yourself with your own reader.
UnitKind = Literal["neuron", "channel", "direction", "feature", "module", "custom"]


@dataclass(frozen=True)
class Unit:
    """One thing to label.

    Attributes:
        name: ``L0.MLP.N12`` (neuron), ``L1.H3`` / ``L0.MLP`` (channel: the norm of its write),
            ``L1.H3:q.d0`` / ``L1.H3:write.d0`` (a direction of a read or write subspace),
            ``sae:blocks.0.hook_mlp_out/F17`` (SAE feature), ``module:0`` (a set of channels).
        kind: ``"neuron"``, ``"channel"``, ``"direction"``, ``"feature"``, ``"module"`` (the
            constructors below) or ``"custom"``.
        hooks: The hook points :meth:`read` needs in the cache.
        channels: The channels the unit belongs to (for graph evidence and circuit categories).
        signed: Whether negative activations carry meaning (directions): then the evidence shows
            the negative tail when it is large and simulation uses a −10…10 scale. Neurons (after
            their nonlinearity), channel and module write norms and SAE features are one-sided.
        members: For a module, the names of the units labeled before it (bottom-up).
        write: A residual-stream vector the unit writes along (output-side evidence), if fixed.
        info: JSON-able description (layer, index, port ...) kept with the label.
    """

    name: str
    kind: UnitKind
    hooks: tuple[str, ...]
    reader: Reader = field(repr=False, compare=False)
    channels: tuple[str, ...] = ()
    signed: bool = False                  # both tails carry meaning (read/write directions)
    members: tuple[str, ...] = ()
    write: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # channels and modules write along no fixed vector: output evidence uses their mean write at the
    # top-activating tokens, read from the cache by this function ([batch, pos, d_model])
    write_reader: Reader | None = field(default=None, repr=False, compare=False)
    pattern: tuple[int, int] | None = None   # (layer, head) of a head: its attention is shown as evidence
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def read(self, cache: Mapping[str, torch.Tensor], model: Any) -> Float[torch.Tensor, "batch pos"]:
        """The unit's activation per token from a cache holding :attr:`hooks`."""
        return self.reader(cache, model)

    @property
    def identity(self) -> Name:
        """The parsed :attr:`name` (``tl_modular._names`` grammar): kind, layer, head, index, hook.

        Raises:
            ValueError: a custom unit whose name follows no form of the grammar.

        >>> Unit("L0.MLP.N12", "neuron", (), reader=None).identity.index      # doctest: +SKIP
        12
        """
        return parse(self.name)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "channels": list(self.channels),
                "members": list(self.members), **({"info": self.info} if self.info else {})}


# --- constructors --------------------------------------------------------------------------

def neurons(model: Any, layer: int, indices: Sequence[int] | None = None) -> list[Unit]:
    """MLP neurons of ``layer`` (all by default), read at ``blocks.{layer}.mlp.hook_post``."""
    channels = segment(model)
    c = channels[mlp_name(layer)]
    hook = act_name("post", layer)
    w_out = c.weights["W_out"].detach()
    idx = range(w_out.shape[0]) if indices is None else indices
    units = []
    for i in idx:
        if not 0 <= int(i) < w_out.shape[0]:
            raise ValueError(f"{c.name} has {w_out.shape[0]} neurons; index {i} is out of range")
        units.append(Unit(name=neuron_name(layer, int(i)), kind="neuron", hooks=(hook,),
                          reader=lambda cache, _m, h=hook, i=int(i): cache[h][..., i],
                          channels=(c.name,), write=w_out[int(i)], info={"layer": layer, "index": int(i)}))
    return units


def _write_reader(c: Channel) -> Reader:
    def read(cache: Mapping[str, torch.Tensor], _model: Any) -> torch.Tensor:
        act = cache[c.source_hook]
        if c.kind == "head":
            return act[..., c.head, :] @ c.weights["W_O"].detach().to(act)
        return act
    return read


def _write_hooks(cs: Sequence[Channel]) -> tuple[str, ...]:
    hooks = []
    for c in cs:
        if c.source_hook is None:
            raise ValueError(f"{c.name} is a constant bias; it has no activation to label")
        if c.source_hook not in hooks:
            hooks.append(c.source_hook)
    return tuple(hooks)


def channel_units(model: Any, names: Sequence[str] | None = None) -> list[Unit]:
    """Heads and MLPs (all by default) as units: the norm of the channel's write per token."""
    channels = segment(model)
    cs = [channels[n] for n in names] if names is not None else channels.of_kind("head", "mlp")
    units = []
    for c in cs:
        write = _write_reader(c)
        pattern = (c.layer, c.head) if c.kind == "head" else None
        hooks = _write_hooks([c]) + ((act_name("pattern", c.layer),) if pattern else ())
        units.append(Unit(name=c.name, kind="channel", hooks=hooks,
                          reader=lambda cache, m, w=write: w(cache, m).norm(dim=-1),
                          channels=(c.name,), write_reader=write, pattern=pattern,
                          info={"layer": c.layer, **({"head": c.head} if c.head is not None else {})}))
    return units


#: Bytes of channel writes stacked at once for a module's summed write (the rows of a batch go in
#: chunks: all 156 channel writes of GPT-2 small on 32 × 128 tokens stacked were 2 GB, twice over).
MODULE_STACK_BYTES = 128 * 2 ** 20


def module_unit(model: Any, name: str, channels: Sequence[str], members: Sequence[str] = ()) -> Unit:
    """A module (set of channels) as a unit: the norm of its channels' summed write."""
    cs = [segment(model)[n] for n in channels]
    writes = [_write_reader(c) for c in cs]
    hooks = _write_hooks(cs)

    def summed(cache: Mapping[str, torch.Tensor], m: Any) -> torch.Tensor:
        return torch.stack([w(cache, m) for w in writes]).sum(0)

    def write(cache: Mapping[str, torch.Tensor], m: Any) -> torch.Tensor:
        acts = {h: cache[h] for h in hooks}
        first = acts[hooks[0]]
        rows, per_row = first.shape[0], len(writes) * first.shape[1] * m.cfg.d_model * first.element_size()
        step = max(1, MODULE_STACK_BYTES // max(per_row, 1))
        if step >= rows:
            return summed(acts, m)
        # the same sum per row as in one stack (each output element adds the channels in the same order)
        return torch.cat([summed({h: a[s:s + step] for h, a in acts.items()}, m) for s in range(0, rows, step)])

    return Unit(name=name, kind="module", hooks=_write_hooks(cs), reader=lambda cache, m: write(cache, m).norm(dim=-1),
                channels=tuple(channels), members=tuple(members), write_reader=write,
                info={"channels": list(channels)})


def direction_units(model: Any, comp: Compression, name: str, *, sides: Sequence[str] | None = None,
                    max_per_side: int | None = None) -> list[Unit]:
    """The basis directions of channel ``name``'s compressed read subspaces (per port, read off its
    normalized input) and write subspace (read off its write), most important first."""
    from tl_modular.sae import subspace_readers

    c = segment(model)[name]
    cc = comp[name]
    units: list[Unit] = []
    for port in cc.read:
        if sides is not None and port not in sides:
            continue
        readers = subspace_readers(model, comp, name, c.input_hook, ports=(port,))
        for j, unit_name in enumerate(readers.names[:max_per_side]):
            v = readers.vectors[:, j]
            units.append(Unit(name=unit_name, kind="direction", hooks=(c.input_hook,),
                              reader=lambda cache, _m, h=c.input_hook, v=v: cache[h] @ v.to(cache[h]),
                              channels=(name,), signed=True, info={"port": port, "index": j, "side": "read"}))
    if sides is None or "write" in sides:
        basis = cc.write.basis.detach().to(torch.float32)
        write = _write_reader(c)
        for j in range(basis.shape[1] if max_per_side is None else min(max_per_side, basis.shape[1])):
            v = basis[:, j]
            units.append(Unit(name=direction_name(name, "write", j), kind="direction", hooks=_write_hooks([c]),
                              reader=lambda cache, m, v=v, w=write: w(cache, m) @ v.to(cache[c.source_hook]),
                              channels=(name,), signed=True, write=v,
                              info={"port": "write", "index": j, "side": "write"}))
    return units


def feature_units(sae: SAE, indices: Sequence[int] | None = None, *, model: Any | None = None) -> list[Unit]:
    """SAE (or transcoder) features as units: ``sae.encode`` of the SAE's hook, feature by feature."""
    from tl_modular.sae import hook_name

    hook = hook_name(sae)
    d_sae = int(sae.cfg.d_sae)
    idx = range(d_sae) if indices is None else indices
    w_dec = sae.W_dec.detach()
    residual = model is not None and w_dec.shape[1] == model.cfg.d_model and hook_kind(hook) != "normalized"
    cache_key: dict[str, Any] = {}

    def encoded(cache: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = cache[hook]
        # one encode per cache for all features of this SAE (the key is the activation's identity)
        if cache_key.get("x") is not x:
            with torch.no_grad():
                cache_key["x"], cache_key["z"] = x, sae.encode(x.to(w_dec))
        return cache_key["z"]

    units = []
    for f in idx:
        if not 0 <= int(f) < d_sae:
            raise ValueError(f"the SAE at {hook} has {d_sae} features; index {f} is out of range")
        units.append(Unit(name=feature_name(hook, int(f)), kind="feature", hooks=(hook,),
                          reader=lambda cache, _m, f=int(f): encoded(cache)[..., f],
                          write=w_dec[int(f)] if residual else None, info={"hook": hook, "index": int(f)}))
    return units


def unit_named(model: Any, name: str, *, comp: Compression | None = None) -> Unit:
    """The unit called ``name``: a neuron (``L1.MLP.N42``), a head or MLP (``L1.H3``, ``L0.MLP``) or,
    with ``comp``, a direction of a compressed side (``L1.H2:k.d3``, ``L1.H2:write.d0``).

    Raises:
        ValueError: ``name`` is none of those (a feature needs its SAE: :func:`feature_units`; a
            module its channels: :func:`module_unit`), or a direction is asked for without ``comp``.

    >>> unit_named(model, "L0.MLP.N12").kind                            # doctest: +SKIP
    'neuron'
    """
    ident = parse(name)
    if ident.kind == "neuron":
        return neurons(model, ident.layer, [ident.index])[0]
    if ident.kind in ("head", "mlp"):
        return channel_units(model, [name])[0]
    if ident.kind == "direction":
        if comp is None:
            raise ValueError(f"{name} is a direction of a compressed side: pass comp= (the Compression)")
        found = [u for u in direction_units(model, comp, ident.channel, sides=(ident.path,)) if u.name == name]
        if not found:
            raise ValueError(f"{ident.channel} has no direction {name}: its {ident.path} side is narrower")
        return found[0]
    raise ValueError(f"{name!r} is a {ident.kind}, not a neuron, head, MLP or direction: build features with "
                     "feature_units(sae) and modules with module_unit(model, name, channels)")


def units_for(target: ChannelSet | Compression | ChannelGraph | Unit | Sequence[Unit], model: Any, *,
              comp: Compression | None = None, max_per_side: int = 2) -> list[Unit]:
    """The units of a ChannelSet (its heads and MLPs), a Compression (each channel's top read and
    write directions), a ChannelGraph (its channels, then its modules with those as members) or
    a list of units (as given)."""
    from tl_modular.compression import Compression
    from tl_modular.graph import ChannelGraph

    if isinstance(target, Unit):
        return [target]
    if isinstance(target, (list, tuple)) and all(isinstance(u, Unit) for u in target):
        if not target:
            raise ValueError("no units to label: the list is empty")
        return list(target)
    if isinstance(target, ChannelSet):
        return channel_units(model, [c.name for c in target.of_kind("head", "mlp")])
    if isinstance(target, Compression):
        out = []
        for name in target:
            out += direction_units(model, target, name, max_per_side=max_per_side)
        return out
    if isinstance(target, ChannelGraph):
        chans = segment(model)
        members = [n for n in target.channels if n in chans.names and chans[n].kind in ("head", "mlp")]
        out = channel_units(model, members)
        for i, mod in enumerate(target.modules()):
            names = [n for n in members if n in mod]
            if names:
                out.append(module_unit(model, module_name(i), names, members=names))
        return out
    raise TypeError(f"label() takes a ChannelSet, Compression, ChannelGraph or a list of Units, "
                    f"got {type(target).__name__}")
