"""End-to-end refinement: a compression's encoders and decoders fitted to the clean model's outputs.

The closed forms choose each side's subspace from second moments, one side at a time and to
second order. With the ranks fixed, gradient descent on the KL divergence from the clean to the
compressed model's next-token distributions — through every restricted channel at once, as
end-to-end SAEs are trained against the model's downstream loss — then moves each side's
encoder, decoder and mean to where the *whole* compressed model agrees best with the clean one.
Started from the closed forms, a few hundred steps suffice (numbers in the README).

>>> refined = comp.refined(model, tokens, steps=300)          # doctest: +SKIP
>>> refined.fidelity(model, held_out)["kl"]                   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from tl_modular._hooks import hook_guard
from tl_modular._tokens import check_tokens
from tl_modular.compression.restriction import restriction_hooks

if TYPE_CHECKING:      # annotations only: compression.py imports this module
    from tl_modular.compression import Compression

__all__ = ["refine"]


def refine(comp: Compression, model: Any, tokens: Int[torch.Tensor, "batch pos"], *, steps: int = 300, lr: float = 3e-3,
           batch_size: int = 8, positions: float = 0.25, attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
           warmup: int | None = None, seed: int = 0, progress: bool = True) -> Compression:
    """A copy of ``comp`` whose kept directions are fitted end to end (see the module docs).

    Every side below its full rank gets a trainable encoder, decoder and mean (initialised from
    ``comp``); each step runs a random batch of ``tokens`` clean and compressed and takes an Adam
    step on ``KL(clean ‖ compressed)`` averaged over predicted positions. The model's parameters
    get no gradient and are left exactly as they were; the hooks are removed on exit.

    Args:
        comp: A :class:`~tl_modular.Compression` of ``model``, ranks already chosen.
        model: The model it was computed on.
        tokens: ``[batch, pos]`` training text (held-out text for judging the result).
        steps, lr, batch_size, seed: The optimisation. ``lr`` is relative: each tensor moves by
            about ``lr`` times its own RMS per step (Adam, one group per tensor), so sides whose
            closed forms come in different units (Fisher-whitened encoders, unit-norm PCA bases)
            train alike.
        positions: The fraction of predicted positions whose KL is taken each step (a random
            subset, an unbiased estimate): the unembedding dominates a step on a real vocabulary.
        warmup: Steps of linear learning-rate warm-up before the cosine decay (default: 5% of
            ``steps``, at least one).
        attention_mask: 1 for real tokens; padded positions are not predicted.

    Returns:
        A Compression with the same ranks; refined sides record ``statistic="<closed form>+refined"``
        and ``config["refined"]`` the settings and the KL before and after.
    """
    comp.check_model(model)
    tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    device = model.cfg.device
    params: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for key, side in comp.sides().items():
        if side.rank < side.max_rank:        # a full-rank side restricts nothing: nothing to fit
            params[key] = tuple(t.detach().to(device, torch.float32).clone().requires_grad_(True)
                                for t in (side.mean, side.encoder, side.decoder))
    if not params:
        return comp
    if not 0 < positions <= 1:
        raise ValueError(f"positions must be a fraction in (0, 1], got {positions!r}")
    if warmup is None:
        warmup = max(1, steps // 20)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 1 <= warmup <= steps:
        raise ValueError(f"warmup must be an integer number of steps in 1..steps ({steps}), got {warmup!r}")
    flat = [t for triple in params.values() for t in triple]
    # Relative steps: a tensor's scale depends on the statistic that produced it (see Args).
    opt = torch.optim.Adam([{"params": [t], "lr": lr * float(t.detach().pow(2).mean().sqrt().clamp_min(1e-8))}
                            for t in flat])
    # warm up, then cosine decay to a tenth: the last steps average out the batch noise instead of
    # jittering around the optimum
    warm = warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0, i - warm) / max(1, steps - warm))))))
    names = list(comp.channels)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(steps), disable=not progress, desc="refine", leave=False)
    for _ in bar:
        rows = torch.randint(0, tokens.shape[0], (min(batch_size, tokens.shape[0]),), generator=gen)
        batch = tokens[rows].to(device)
        mask = None if attention_mask is None else attention_mask[rows].to(device)
        kwargs = {} if mask is None else {"attention_mask": mask}
        n_pred = batch.shape[1] - 1
        keep = torch.randperm(n_pred, generator=gen)[:max(1, round(positions * n_pred))].sort().values.to(device)
        with torch.no_grad():
            clean = _log_probs(model, batch, kwargs, keep)
        hooks = restriction_hooks(model, comp, names, restrict_first=False, override=params)
        with torch.enable_grad(), hook_guard(model), model.hooks(fwd_hooks=hooks):
            logp = _log_probs(model, batch, kwargs, keep)
            kl = (clean.exp() * (clean - logp)).sum(-1)
            weights = torch.ones_like(kl) if mask is None else mask[:, 1:][:, keep].to(kl)
            loss = (kl * weights).sum() / weights.sum().clamp_min(1)
            grads = torch.autograd.grad(loss, flat)      # no gradient reaches the model's parameters
        for t, g in zip(flat, grads, strict=True):
            t.grad = g
        opt.step()
        sched.step()
        history.append(loss.item())
        bar.set_postfix(kl=f"{history[-1]:.4f}")
    channels = dict(comp.channels)
    for (name, key), (mu, enc, dec) in params.items():
        c = channels[name]
        side = c.write if key == "write" else c.read[key[5:]]
        r = side.rank
        new = replace(side, mean=mu.detach().to(side.mean), statistic=side.statistic.split("+")[0] + "+refined",
                      full_encoder=torch.cat([enc.detach().to(side.full_encoder), side.full_encoder[:, r:]], 1),
                      full_decoder=torch.cat([dec.detach().to(side.full_decoder), side.full_decoder[:, r:]], 1))
        if key == "write":
            channels[name] = replace(c, write=new)
        else:
            channels[name] = replace(c, read=type(c.read)({**dict(c.read), key[5:]: new}))   # a ReadSpace
    tail = max(1, steps // 10)
    config = {**comp.config, "refined": {"steps": steps, "lr": lr, "batch_size": batch_size, "positions": positions,
                                         "warmup": warmup, "seed": seed,
                                         "kl_first": history[0], "kl_last": sum(history[-tail:]) / tail}}
    return replace(comp, channels=channels, config=config)


def _log_probs(model: Any, batch: torch.Tensor, kwargs: dict, keep: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at the predicted positions ``keep`` only.

    LayerNorm and the unembedding act per position, so unembedding a subset is exact for it; the
    blocks still run over every position (attention needs them)."""
    resid = model(batch, stop_at_layer=model.cfg.n_layers, **kwargs)[:, keep]
    return model.unembed(model.ln_final(resid)).float().log_softmax(-1)
