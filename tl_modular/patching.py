"""Activation patching and route (path) patching on channels, by hooks only.

A *route* is a direct edge of the residual stream from a sender channel to a receiver *port*:
a head's query, key or value input (``"L1.H3:q"``, ``":k"``, ``":v"``), an MLP's input
(``"L1.MLP"``) or the unembedding (``"unembed"``). Patching a route runs the model on its
tokens while that receiver port sees the sender's write replaced by a source value (the
sender's write on corrupted tokens, its mean, zero); every other reader sees the real write,
and the receiver's changed output flows on downstream. This is edge patching as in ACDC: a
set of routes patched together carries the source values on exactly those edges, whatever
else changed upstream. Patching *all* routes out of a channel equals activation patching it. :func:`path_effect` is
path patching as in Wang et al. (2022): the sender reaches the receivers directly and through the
MLPs in between, which are recomputed (attention heads in between are not part of the path).

>>> channels = tlm.segment(model)                                            # doctest: +SKIP
>>> corrupt = capture_writes(model, channels, task.corrupted, ["L0.H3"])     # doctest: +SKIP
>>> logits = patch_routes(model, channels, task.clean, [("L0.H3", "L1.H6:k")], corrupt)  # doctest: +SKIP
>>> route_effect(model, task, [("L0.H3", "L1.H6:k")]).fraction            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch.utils.checkpoint import checkpoint

from tl_modular._hooks import hook_guard
from tl_modular._names import UNEMBED, act_name, port_hook, port_name, split_port, stream_index
from tl_modular.segmentation import Channel, ChannelSet, segment
from tl_modular.tasks.task import Task

__all__ = [
    "PatchEffect",
    "Route",
    "capture_writes",
    "channel_write",
    "channel_effect",
    "mean_writes",
    "patch_channels",
    "path_effect",
    "patch_routes",
    "ports",
    "route_effect",
    "split_inputs",
    "valid_route",
]

Route = tuple[str, str]
Baseline = Literal["corrupted", "mean", "zero"]


# --- ports and the order of the residual stream -----------------------------------------

def ports(channels: ChannelSet) -> list[str]:
    """Every receiver port of the model, in forward order: heads' ``:q``, ``:k``, ``:v``,
    MLPs, and ``unembed``."""
    out = []
    for c in channels:
        if c.kind == "head":
            out += [port_name(c.name, path) for path in ("q", "k", "v")]
        elif c.kind == "mlp":
            out.append(port_name(c.name))
    return out + [UNEMBED]


def _port(channels: ChannelSet, port: str) -> tuple[str, int | None, int]:
    """(hook name, head index into that hook or None, stream index read) of a port."""
    n_layers = channels.model.cfg.n_layers
    if port == UNEMBED:
        return channels.final_hook, None, 2 * n_layers
    name, path = split_port(port)
    if name not in channels:
        raise KeyError(f"unknown port {port!r}: no channel {name!r}; ports look like 'L1.H3:k', "
                       "'L1.MLP' or 'unembed'")
    c = channels[name]
    read = stream_index(c.reads[0])
    if (c.kind == "head" and path in ("q", "k", "v")) or (c.kind == "mlp" and not path):
        return (*port_hook(c, path), read)
    raise KeyError(f"unknown port {port!r}: heads have ports ':q', ':k', ':v'; an MLP's port is its "
                   "channel name; the logits' port is 'unembed'")


def valid_route(channels: ChannelSet, sender: str, port: str) -> bool:
    """Whether ``sender`` writes into the residual stream before ``port`` reads it."""
    c = channels[sender]
    return stream_index(c.writes) <= _port(channels, port)[2]


# --- writes --------------------------------------------------------------------------------

def channel_write(channel: Channel, activation: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A channel's write into the residual stream from its source activation (``activation`` of its
    ``source_hook``; a bias channel's constant write is shaped ``like``).

    >>> write = channel_write(channels["L0.H3"], cache["blocks.0.attn.hook_z"], resid)   # doctest: +SKIP
    """
    if channel.kind == "bias":
        return channel.weights["b_O"].detach().to(like).expand_as(like)
    if channel.kind == "head":
        w_o = channel.weights["W_O"].detach().to(activation)
        return activation[..., channel.head, :] @ w_o
    return activation


@torch.no_grad()
def capture_writes(model: Any, channels: ChannelSet, tokens: Int[torch.Tensor, "batch pos"],
                   names: Sequence[str] | None = None) -> dict[str, Float[torch.Tensor, "batch pos d_model"]]:
    """Each named channel's write into the residual stream on ``tokens`` (all channels by default)."""
    names = list(channels.names if names is None else names)
    _, cache = channels.run_with_cache(tokens)
    parts = channels.contributions(cache, channels=names)
    return dict(zip(names, parts, strict=True))


@torch.no_grad()
def mean_writes(model: Any, channels: ChannelSet, tokens: Int[torch.Tensor, "batch pos"],
                names: Sequence[str] | None = None, *, per_position: bool = True
                ) -> dict[str, torch.Tensor]:
    """Each channel's mean write over ``tokens``: ``[pos, d_model]`` per position (for prompts of a
    fixed template), or ``[d_model]`` over all positions but the first (whose residual is an
    outlier in trained models)."""
    writes = capture_writes(model, channels, tokens, names)
    if per_position:
        return {k: v.mean(0) for k, v in writes.items()}
    return {k: v[:, 1:].reshape(-1, v.shape[-1]).mean(0) for k, v in writes.items()}


# --- the hook machinery ------------------------------------------------------------------

@contextmanager
def split_inputs(model: Any) -> Iterator[None]:
    """Run ``model`` with separate query/key/value inputs per head (``hook_q_input`` ...) and a
    separate MLP input (``hook_mlp_in``); the flags are restored on exit, also on errors."""
    cfg = model.cfg
    saved = {k: getattr(cfg, k, False) for k in ("use_attn_in", "use_split_qkv_input", "use_hook_mlp_in")}
    try:
        if saved["use_attn_in"]:
            model.set_use_attn_in(False)
        model.set_use_split_qkv_input(True)
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(True)
        yield
    finally:
        model.set_use_split_qkv_input(saved["use_split_qkv_input"])
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(saved["use_hook_mlp_in"])
        if saved["use_attn_in"]:
            model.set_use_attn_in(True)


def _check_source(source: Mapping[str, torch.Tensor], names: set[str]) -> None:
    missing = sorted(names - set(source))
    if missing:
        raise KeyError(f"no source value for channel(s) {missing}; pass their writes from "
                       "capture_writes(...) or mean_writes(...)")


def patch_routes(model: Any, channels: ChannelSet, tokens: Int[torch.Tensor, "batch pos"],
                 routes: Sequence[Route], source: Mapping[str, torch.Tensor],
                 amount: Float[torch.Tensor, " routes"] | None = None,
                 **forward_kwargs: Any) -> torch.Tensor:
    """Run ``tokens`` with each route ``(sender, port)`` carrying ``source[sender]``.

    Args:
        routes: ``(sender channel, receiver port)`` pairs; see :func:`ports`.
        source: Replacement writes per sender, broadcastable to ``[batch, pos, d_model]``.
        amount: How far each route is patched, ``0`` (clean) to ``1`` (carries the source; the
            default for all): the port sees ``write + amount * (source - write)``. Differentiable,
            so a relaxed circuit (a mask over routes) can be learnt by gradient descent.
        **forward_kwargs: Passed to the model's forward (default ``return_type="logits"``).

    Returns:
        What the model's forward returns (the logits by default).
    """
    if amount is not None and amount.shape != (len(routes),):
        raise ValueError(f"amount must hold one value per route: shape ({len(routes)},), got {tuple(amount.shape)}")
    by_port = _senders_by_port(channels, routes)
    _check_source(source, {s for s, _ in routes})
    patch = _RoutePatch(channels, source, [c for cs in by_port.values() for c in cs])
    fwd_hooks = patch.capture_hooks()
    if amount is None:
        fwd_hooks += [patch.full_hook(port, port_senders) for port, port_senders in by_port.items()]
    else:
        fwd_hooks += patch.partial_hooks(routes, amount)
    with hook_guard(model), split_inputs(model), model.hooks(fwd_hooks=fwd_hooks):
        return model(tokens, **forward_kwargs)


def _senders_by_port(channels: ChannelSet, routes: Sequence[Route]) -> dict[str, list[Channel]]:
    """The senders patched into each port, in the order given; every route checked to exist."""
    by_port: dict[str, list[Channel]] = {}
    for sender, port in routes:
        if not valid_route(channels, sender, port):
            raise ValueError(f"route {sender} -> {port} does not exist: {sender} writes after "
                             f"{port} reads the residual stream")
        by_port.setdefault(port, []).append(channels[sender])
    return by_port


class _RoutePatch:
    """The hooks of one patched run and what they share: each sender's write as the run computes it
    and its delta ``source - write`` (once per run), summed upstream of a reader in stream order."""

    def __init__(self, channels: ChannelSet, source: Mapping[str, torch.Tensor], senders: Sequence[Channel]) -> None:
        self.channels, self.source = channels, source
        self.senders = {c.name: c for c in senders}
        self.order = sorted(self.senders.values(), key=lambda c: stream_index(c.writes))
        self.current: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.summed, self.total = 0, None       # how many of `order` are in the running sum, and the sum

    def capture_hooks(self) -> list[tuple[str, Any]]:
        """Hooks that keep the senders' source activations as the run goes."""
        hooks = sorted({c.source_hook for c in self.senders.values() if c.source_hook})
        return [(h, self._remember) for h in hooks]

    def _remember(self, activation: torch.Tensor, hook: Any) -> None:
        self.current[hook.name] = activation

    def delta(self, c: Channel, like: torch.Tensor) -> torch.Tensor:
        if c.name not in self.deltas:
            self.deltas[c.name] = self.source[c.name].to(like) - channel_write(c, self.current.get(c.source_hook), like)
        return self.deltas[c.name]

    def upstream(self, read: int, like: torch.Tensor) -> torch.Tensor:
        """Σ of every sender's delta written at or before stream index ``read`` (hooks fire in order)."""
        while self.summed < len(self.order) and stream_index(self.order[self.summed].writes) <= read:
            d = self.delta(self.order[self.summed], like)
            self.total = d if self.total is None else self.total + d
            self.summed += 1
        return torch.zeros_like(like) if self.total is None else self.total

    def full_hook(self, port: str, port_senders: list[Channel]) -> tuple[str, Any]:
        """The hook that gives ``port`` every one of ``port_senders``' source values."""
        index_hook, index, read = _port(self.channels, port)
        # Patching most routes into a port (a circuit's complement) is cheaper as "every upstream
        # sender minus the few left clean" than as a sum over the patched ones.
        names = {c.name for c in port_senders}
        left = [c for c in self.order if stream_index(c.writes) <= read and c.name not in names]
        by_complement = len(left) < len(port_senders)

        def hook_fn(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            like = activation if index is None else activation[..., index, :]
            if by_complement:
                change = self.upstream(read, like) - sum((self.delta(c, like) for c in left), torch.zeros_like(like))
            else:
                change = sum((self.delta(c, like) for c in port_senders), torch.zeros_like(like))
            activation = activation.clone()
            if index is None:
                activation += change
            else:
                activation[..., index, :] += change
            return activation
        return index_hook, hook_fn

    def partial_hooks(self, routes: Sequence[Route], amount: torch.Tensor) -> list[tuple[str, Any]]:
        """One hook per hook point mixing in ``amount[i]`` of route ``i``'s delta."""
        by_hook: dict[str, list[tuple[int | None, str, int]]] = {}
        for i, (sender, port) in enumerate(routes):
            hook, index, _ = _port(self.channels, port)
            by_hook.setdefault(hook, []).append((index, sender, i))
        return [(hook, self._blend(slots, amount)) for hook, slots in by_hook.items()]

    def _blend(self, slots: list[tuple[int | None, str, int]], amount: torch.Tensor) -> Any:
        # Partial patching, vectorised per hook: one stack of the senders' deltas and one mix for
        # every head the hook feeds (a differentiable mask's forward runs many times).
        names = sorted({s for _, s, _ in slots})
        column = {s: j for j, s in enumerate(names)}
        heads = torch.tensor([0 if h is None else h for h, _, _ in slots])
        cols = torch.tensor([column[s] for _, s, _ in slots])
        picks = torch.tensor([i for _, _, i in slots])
        per_head = slots[0][0] is not None

        def hook_fn(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            like = activation[..., 0, :] if per_head else activation
            deltas = [self.delta(self.channels[s], like) for s in names]
            rows = activation.shape[-2] if per_head else 1
            mix = torch.zeros(rows, len(names), dtype=like.dtype, device=like.device)
            mix = mix.index_put((heads.to(like.device), cols.to(like.device)),
                                amount[picks.to(amount.device)].to(like), accumulate=True)
            if not torch.is_grad_enabled() or not (mix.requires_grad or any(d.requires_grad for d in deltas)):
                return activation + _mixed(per_head, mix, *deltas)
            # The einsum keeps its stack of deltas ([senders, batch, pos, d_model]: 0.25 GB per hook
            # point at GPT-2-small shape, 32 prompts, 12 GB over a forward) for the backward pass; the
            # deltas themselves stay alive anyway, so the stack is rebuilt there instead (the same
            # operations in the same graph: bitwise the same gradients).
            return activation + checkpoint(_mixed, per_head, mix, *deltas, use_reentrant=False)
        return hook_fn


def _mixed(per_head: bool, mix: torch.Tensor, *deltas: torch.Tensor) -> torch.Tensor:
    """``Σ_s mix[h, s] delta_s`` for every head ``h`` (``per_head``), else ``Σ_s mix[0, s] delta_s``."""
    stack = torch.stack(deltas)                                                        # [senders, ..., d]
    if per_head:
        return torch.einsum("hs,s...d->...hd", mix, stack)
    return torch.einsum("s,s...->...", mix[0], stack)


def patch_channels(model: Any, channels: ChannelSet, tokens: Int[torch.Tensor, "batch pos"],
                   names: Sequence[str], source: Mapping[str, torch.Tensor],
                   **forward_kwargs: Any) -> torch.Tensor:
    """Activation patching: run ``tokens`` with each named channel's write replaced by
    ``source[name]`` for every reader downstream."""
    _check_source(source, set(names))
    by_layer_bias: dict[str, torch.Tensor] = {}
    fwd_hooks = []
    for name in names:
        c = channels[name]
        if c.kind == "bias":
            # A bias is a constant: patch it where it enters, as a shift of the attention output.
            by_layer_bias[act_name("attn_out", c.layer)] = source[name] - c.weights["b_O"].detach()
            continue

        w_o = c.weights["W_O"].detach() if c.kind == "head" else None
        # A head's write is z @ W_O: change z by the write difference's pre-image through W_O's
        # pseudo-inverse (exact, since every head write lies in W_O's row space).
        w_o_pinv = torch.linalg.pinv(w_o.double()).to(w_o.dtype) if w_o is not None else None

        def hook_fn(activation: torch.Tensor, hook: Any, c: Channel = c, w_o=w_o, w_o_pinv=w_o_pinv) -> torch.Tensor:
            activation = activation.clone()
            new = source[c.name].to(activation)
            if c.kind == "head":
                delta = new - activation[..., c.head, :] @ w_o.to(activation)
                activation[..., c.head, :] += delta @ w_o_pinv.to(activation)
            else:
                activation[...] = new.expand_as(activation)
            return activation
        fwd_hooks.append((c.source_hook, hook_fn))
    for hook, shift in by_layer_bias.items():
        fwd_hooks.append((hook, lambda act, hook, shift=shift: act + shift.to(act)))
    with hook_guard(model), model.hooks(fwd_hooks=fwd_hooks):
        return model(tokens, **forward_kwargs)


# --- effects on a task's metric -----------------------------------------------------------

@dataclass(frozen=True)
class PatchEffect:
    """Metric of the clean run, the corrupted run and the patched run, and the fraction of the
    clean-minus-corrupted gap that the patch removes: ``(clean - patched) / (clean - corrupted)``."""

    clean: float
    corrupted: float
    patched: float

    @property
    def fraction(self) -> float:
        gap = self.clean - self.corrupted
        return float("nan") if gap == 0 else (self.clean - self.patched) / gap


def _source(model: Any, channels: ChannelSet, task: Task, names: Sequence[str],
            baseline: Baseline) -> dict[str, torch.Tensor]:
    if baseline == "corrupted":
        return capture_writes(model, channels, task.corrupted, names)
    if baseline == "mean":
        return mean_writes(model, channels, task.clean, names)
    if baseline == "zero":
        return {n: torch.zeros(model.cfg.d_model) for n in names}
    raise ValueError(f"baseline must be 'corrupted', 'mean' or 'zero', got {baseline!r}")


@torch.no_grad()
def route_effect(model: Any, task: Task, routes: Sequence[Route], *, baseline: Baseline = "corrupted",
                 channels: ChannelSet | None = None) -> PatchEffect:
    """How much of the task's metric the routes carry (path patching of clean vs ``baseline``).

    >>> route_effect(model, tlm.toy.induction(256), [("L0.H3", "L1.H6:k")]).fraction  # doctest: +SKIP
    0.8...
    """
    channels = channels or segment(model)
    source = _source(model, channels, task, sorted({s for s, _ in routes}), baseline)
    patched = patch_routes(model, channels, task.clean, routes, source)
    return PatchEffect(float(task.metric(model(task.clean))), float(task.metric(model(task.corrupted))),
                       float(task.metric(patched)))


@torch.no_grad()
def channel_effect(model: Any, task: Task, names: Sequence[str], *, baseline: Baseline = "corrupted",
                   channels: ChannelSet | None = None) -> PatchEffect:
    """How much of the task's metric the channels carry (activation patching vs ``baseline``)."""
    channels = channels or segment(model)
    source = _source(model, channels, task, list(names), baseline)
    patched = patch_channels(model, channels, task.clean, names, source)
    return PatchEffect(float(task.metric(model(task.clean))), float(task.metric(model(task.corrupted))),
                       float(task.metric(patched)))


@torch.no_grad()
def path_effect(model: Any, task: Task, sender: str, receivers: Sequence[str], *, through_mlps: bool = True,
                baseline: Baseline = "corrupted", channels: ChannelSet | None = None) -> PatchEffect:
    """How much of the task's metric flows from ``sender`` to the receiver ports along paths that
    leave every attention head in between clean (path patching, Wang et al. 2022).

    With ``through_mlps`` the MLPs between sender and receivers are part of the path: each is
    recomputed with the sender's patched write (and the recomputed MLPs before it) on its input,
    one pass per MLP, and its recomputed write reaches the receivers; no other reader sees any of it.

    >>> path_effect(model, tlm.toy.induction(512), "L0.H0", ["L1.H0:k", "L1.H1:k"]).fraction  # doctest: +SKIP
    """
    channels = channels or segment(model)
    for port in receivers:
        if not valid_route(channels, sender, port):
            raise ValueError(f"route {sender} -> {port} does not exist: {sender} writes after {port} reads")
    source = _source(model, channels, task, [sender], baseline)
    path = []
    if through_mlps:
        for mlp in sorted(channels.of_kind("mlp"), key=lambda c: c.layer):
            if valid_route(channels, sender, mlp.name) and any(valid_route(channels, mlp.name, r) for r in receivers):
                routes = [(sender, mlp.name)] + [(m, mlp.name) for m in path if valid_route(channels, m, mlp.name)]
                out: dict[str, torch.Tensor] = {}
                keep = lambda a, hook, out=out: out.__setitem__("w", a.clone())  # noqa: E731
                with hook_guard(model), model.hooks(fwd_hooks=[(mlp.source_hook, keep)]):
                    patch_routes(model, channels, task.clean, routes, source)
                source[mlp.name] = out["w"]
                path.append(mlp.name)
    routes = [(s, r) for s in [sender, *path] for r in receivers if valid_route(channels, s, r)]
    patched = patch_routes(model, channels, task.clean, routes, source)
    return PatchEffect(float(task.metric(model(task.clean))), float(task.metric(model(task.corrupted))),
                       float(task.metric(patched)))
