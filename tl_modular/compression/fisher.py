"""Fisher moments: which directions of each channel's input and output the model's predictions use.

A channel restricted to a subspace changes the residual stream by some ``δ``; to second order
the predictions move by ``KL ≈ ½ δᵀ F δ``, where ``F = E[g gᵀ]`` is the Fisher information of
the model's next-token distributions with respect to that activation: ``g`` is the gradient of
``Σ_t log p(y_t)`` with every ``y_t`` *sampled from the model itself* (so ``F`` is the true
Fisher, the Hessian of the KL to the clean model — not the empirical one of the training labels).
One forward and one backward pass per batch give, for every layer, ``F`` at the attention and
MLP outputs (what the channels' writes are judged by) and, per head and MLP, the moment of the
gradient at each read port (what their reads are judged by), all in float64, streaming.

Those moments make compression *downstream-aware*: ``tlm.compress(..., read="fisher",
write="fisher")`` keeps the directions that matter to the output, and their spectra are in the
same unit everywhere (twice the KL a dropped direction costs), so a budget is spent where it
buys the most fidelity across all channels.

>>> fisher = tlm.compression.collect_fisher(model, tokens)          # doctest: +SKIP
>>> fisher.writes["blocks.1.hook_mlp_out"].shape               # doctest: +SKIP
torch.Size([192, 192])
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tl_modular import _dist
from tl_modular._hooks import hook_guard
from tl_modular._names import act_name
from tl_modular._tokens import check_tokens, position_weights
from tl_modular.compression.statistics import Statistics, _Accumulator, read_map
from tl_modular.errors import UnsupportedModelError
from tl_modular.segmentation import Channel, ChannelSet, segment

__all__ = ["FisherStats", "collect_fisher"]


@dataclass
class FisherStats:
    """Fisher moments of one pass.

    Attributes:
        writes: ``{hook: F}`` at each layer's ``hook_attn_out`` and ``hook_mlp_out``,
            ``[d_model, d_model]``: the Fisher of what a channel of that layer writes.
        ports: ``{(channel, port): G}``: the gradient moment at a head's ``q``/``k``/``v``
            (``[d_head, d_head]``, the head's own slice) or an MLP's input, mapped to its input
            coordinates (``[d_model, d_model]``).
        n_tokens: Positions averaged over (position 0 and padding excluded).
    """

    writes: dict[str, Float[torch.Tensor, "d_model d_model"]]
    ports: dict[tuple[str, str], torch.Tensor]
    n_tokens: int
    seconds: float = 0.0
    channel_names: list[str] = field(default_factory=list)
    #: The first and second moments of the same pass (inputs, writes), with ``moments=True``.
    statistics: Statistics | None = None


def collect_fisher(model: Any, tokens: Int[torch.Tensor, "batch pos"], channels: ChannelSet | None = None, *,
                   names: Sequence[str] | None = None, attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
                   batch_size: int = 16, seed: int = 0, moments: bool = False, progress: bool = True) -> FisherStats:
    """One forward and backward pass per batch, labels sampled from the model (see module docs).

    Gradients are taken with ``torch.autograd.grad`` with respect to the hooked activations only:
    no parameter gradient is computed or left behind, and the model's ``requires_grad`` flags are
    untouched. Hooks are removed on exit, also on error or interrupt.

    Args:
        model: A HookedTransformer (or TransformerBridge in compatibility mode).
        tokens: ``[batch, pos]`` token ids.
        channels, names: The heads and MLPs whose read ports get moments (all by default).
        attention_mask: 1 for real tokens; padded positions are neither inputs nor predictions.
        seed: Seeds the sampled labels (with each batch's index: the same samples for any
            number of ranks under ``torch.distributed``, where each rank takes its shard of the
            batches and the moments are all-reduced in float64).
        moments: Also accumulate, from the same forward pass, the input and write moments
            Fisher-based compression needs (``.statistics``, without Jacobian moments): one pass
            for ``compress(read="fisher", write="fisher")``.
    """
    started = time.perf_counter()
    channels = channels or segment(model)
    tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    chosen = [channels[n] for n in names] if names is not None else channels.of_kind("head", "mlp")
    acc = _Accumulator(model, channels, "closed_form", 1, seed, [c.name for c in chosen], jacobians=False) \
        if moments else None
    plan = _plan(model, chosen, acc.hook_names() if acc else [])
    device = model.cfg.device
    sums: dict[Any, torch.Tensor] = {}
    n_tokens = 0.0
    gen = torch.Generator(device=device).manual_seed(seed)
    _dist.check_consistent("collect_fisher", model, tokens, attention_mask, names=names, batch_size=batch_size,
                           seed=seed, moments=moments)
    for index, batch, mask in _batches(tokens, attention_mask, batch_size, device, progress):
        gen.manual_seed(_dist.batch_seed(seed, index))
        acts, grads = _gradients(model, plan, batch, mask, gen)
        if acc is not None:
            acc.consume({h: a.detach() for h, a in acts.items()}, batch, mask)
        w = position_weights(batch, mask)                                   # 0 at position 0 and padding
        n_tokens += float(w.sum())
        _accumulate(sums, plan, grads, w)
    sums, n_tokens = _all_reduce(sums, n_tokens, acc, device)
    if n_tokens == 0:
        raise ValueError("no position after the first is a real token: nothing to average")
    writes, ports = _averages(plan, sums, n_tokens)
    return FisherStats(writes, ports, int(n_tokens), time.perf_counter() - started, [c.name for c in chosen],
                       acc.finish() if acc is not None else None)


def _batches(tokens: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int, device: Any,
             progress: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """This rank's ``(batch index, tokens, mask)``, on ``device``."""
    bar = tqdm(_dist.batch_starts(tokens.shape[0], batch_size), disable=not progress or not _dist.is_main(),
               desc="fisher", leave=False)
    for start in bar:
        mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
        yield start // batch_size, tokens[start:start + batch_size].to(device), mask


@dataclass
class _Plan:
    """The hooks one pass reads, by what their gradients are for."""

    heads: list[Channel]
    mlps: list[Channel]
    write_hooks: list[str]                       # where the chosen channels' writes land
    head_hooks: list[str]                        # the heads' q / k / v
    mlp_ports: dict[str, list[tuple[str, str]]]  # MLP name -> [(hook, port)]
    maps: dict[tuple[str, str], torch.Tensor]    # (MLP, port) -> its map from input coordinates
    hooks: list[str]                             # every hook read (also the moments' inputs)

    @property
    def graded(self) -> list[str]:
        """The hooks whose gradient the moments need."""
        return self.write_hooks + self.head_hooks + sorted({h for ports in self.mlp_ports.values() for h, _ in ports})


def _plan(model: Any, chosen: list[Channel], extra_hooks: list[str]) -> _Plan:
    """What one pass over ``chosen`` reads (``extra_hooks``: the activations the moments need)."""
    cfg = model.cfg
    heads = [c for c in chosen if c.kind == "head"]
    mlps = [c for c in chosen if c.kind == "mlp"]
    # where each chosen channel's write lands (attention-only models have no hook_mlp_out)
    write_hooks = sorted({act_name("attn_out", c.layer) for c in heads} | {act_name("mlp_out", c.layer) for c in mlps})
    head_hooks = sorted({act_name(p, c.layer) for c in heads for p in "qkv"})
    # an MLP's read ports: its pre-activation (the gate's, for gated MLPs) and the linear branch
    mlp_ports = {c.name: [(act_name("pre", c.layer), "gate" if cfg.gated_mlp else "in")]
                 + ([(act_name("pre_linear", c.layer), "in")] if cfg.gated_mlp else []) for c in mlps}
    mlp_hooks = sorted({h for c in mlps for h, _ in mlp_ports[c.name]})
    hooks = sorted(set(write_hooks + head_hooks + mlp_hooks + extra_hooks))
    maps = {(c.name, port): read_map(c, port).to(cfg.device) for c in mlps for _, port in mlp_ports[c.name]}
    return _Plan(heads, mlps, write_hooks, head_hooks, mlp_ports, maps, hooks)


def _gradients(model: Any, plan: _Plan, batch: torch.Tensor, mask: torch.Tensor | None,
               gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """``(activations, gradients)`` at every hook of ``plan``: one forward pass, labels sampled
    from the model's own predictions, and one backward pass of their summed log-probability."""
    acts: dict[str, torch.Tensor] = {}

    def start_graph(act: torch.Tensor, hook: Any) -> torch.Tensor:
        # the token embedding as a leaf of our own: every later activation requires grad
        # whatever the parameters' requires_grad flags say
        return act.detach().requires_grad_(True)

    def grab(name: str):
        # keyed by the name asked for: a TransformerBridge's hook points carry their own names
        # behind the HookedTransformer aliases
        def fn(act: torch.Tensor, hook: Any) -> None:
            acts[name] = act
        return fn

    kwargs = {} if mask is None else {"attention_mask": mask}
    fwd = [(act_name("embed"), start_graph)] + [(h, grab(h)) for h in plan.hooks]
    with torch.enable_grad(), hook_guard(model), model.hooks(fwd_hooks=fwd):
        logits = model(batch, **kwargs).float()
        logp = logits[:, :-1].log_softmax(-1)
        with torch.no_grad():
            sampled = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=gen)
        picked = logp.reshape(-1, logp.shape[-1]).gather(-1, sampled).reshape(logp.shape[:2])
        if mask is not None:
            picked = picked * mask[:, 1:].to(picked)
        ordered = [acts[h] for h in plan.hooks]
        grads = dict(zip(plan.hooks, torch.autograd.grad(picked.sum(), ordered, allow_unused=True), strict=True))
    unused = [h for h in plan.graded if grads[h] is None]
    if unused:
        # e.g. a TransformerBridge whose hook point holds a copy the forward does not read on from
        raise UnsupportedModelError(
            f"Fisher statistics need the loss's gradient at {unused[0]}, but this model's forward does not "
            f"pass through the activation that hook sees ({type(model).__name__}); use read='whitened' "
            "(or another Jacobian statistic) for this model")
    return acts, grads


def _accumulate(sums: dict[Any, torch.Tensor], plan: _Plan, grads: dict[str, Any], w: torch.Tensor) -> None:
    """Add one batch's gradient moments, each position weighted by ``w``, to ``sums`` (float64)."""
    def add(key: Any, value: torch.Tensor) -> None:
        sums[key] = value if key not in sums else sums[key] + value

    for h in plan.write_hooks:
        g = grads[h].to(torch.float64) * w[..., None].sqrt()
        add(h, torch.einsum("bpi,bpj->ij", g, g))
    for h in plan.head_hooks:
        g = grads[h].to(torch.float64) * w[..., None, None].sqrt()              # [b, p, n_heads, d_head]
        add(h, torch.einsum("bphi,bphj->hij", g, g))
    for c in plan.mlps:
        g_in = sum(grads[h].to(torch.float64) @ plan.maps[(c.name, port)].T
                   for h, port in plan.mlp_ports[c.name])                         # [b, p, d_model]
        g_in = g_in * w[..., None].sqrt()
        add(("mlp", c.name), torch.einsum("bpi,bpj->ij", g_in, g_in))


def _all_reduce(sums: dict[Any, Any], n_tokens: float, acc: _Accumulator | None, device: Any
                ) -> tuple[dict[Any, Any], float]:
    """``(sums, n_tokens)`` added over the ranks under ``torch.distributed`` (the moments too)."""
    if not _dist.active():
        return sums, n_tokens
    sums = _dist.all_reduce_sum({**sums, ("n_tokens",): n_tokens}, device=device)
    n_tokens = float(sums.pop(("n_tokens",)))
    if acc is not None:
        acc.all_reduce()
    return sums, n_tokens


def _averages(plan: _Plan, sums: dict[Any, torch.Tensor], n_tokens: float
              ) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], torch.Tensor]]:
    """``(writes, ports)``: the summed moments per position, heads cut to their own slice."""
    writes = {h: sums[h] / n_tokens for h in plan.write_hooks if h in sums}
    ports: dict[tuple[str, str], torch.Tensor] = {}
    for c in plan.heads:
        for p in "qkv":
            index = c.head if p == "q" else c.kv_head
            ports[(c.name, p)] = sums[act_name(p, c.layer)][index] / n_tokens
    for c in plan.mlps:
        ports[(c.name, "in")] = sums[("mlp", c.name)] / n_tokens
    return writes, ports
