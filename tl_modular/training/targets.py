"""The fixed targets of :func:`~tl_modular.training.build_interpretable`: the rows a layer's labels are
simulated on, and the simulations mapped back to activations (see the module docs of
:mod:`tl_modular.training.interpretable`, "Targets")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from tl_modular import labeling
from tl_modular._aio import run_sync
from tl_modular._hooks import run_with_cache
from tl_modular._io import read_safetensors, reading, write_safetensors
from tl_modular._names import act_name, neuron_name
from tl_modular._tokens import valid_positions
from tl_modular.labeling import Labels, LLMError, Simulator
from tl_modular.training.build_config import BuildConfig


@dataclass
class _LabelRows:
    """The labeling tokens and the rows the labels are simulated on (training and held-out)."""

    tokens: torch.Tensor
    mask: torch.Tensor | None
    valid: torch.Tensor             # positions that count (not position 0, not padding)
    real: torch.Tensor              # real tokens: a row's simulated context is these, in order
    strs: list[list[str]]
    train: torch.Tensor
    heldout: torch.Tensor
    labeled: list[int]              # the neurons labeled in every layer

    @classmethod
    def choose(cls, model: Any, tokens: torch.Tensor, mask: torch.Tensor | None, cfg: BuildConfig) -> _LabelRows:
        valid = valid_positions(tokens, mask)
        # predictions go back to the positions of the real tokens they were made on
        real = mask.bool() if mask is not None else torch.ones_like(tokens, dtype=torch.bool)
        strs = labeling.str_tokens(model, tokens)
        explain, heldout = labeling.split_rows(tokens.shape[0], cfg.evidence)
        gen = np.random.default_rng(cfg.seed)
        train_rows = torch.as_tensor(np.sort(gen.permutation(explain)[:cfg.n_contexts]), dtype=torch.long)
        heldout_rows = torch.as_tensor(np.sort(gen.permutation(heldout)[:cfg.n_heldout]), dtype=torch.long)
        d_mlp = model.cfg.d_mlp
        labeled = list(range(d_mlp if cfg.neurons is None else min(cfg.neurons, d_mlp)))
        if cfg.keep_free >= len(labeled):
            raise ValueError(f"keep_free={cfg.keep_free} leaves none of the {len(labeled)} labeled neurons "
                             "constrained")
        return cls(tokens, mask, valid, real, strs, train_rows, heldout_rows, labeled)


@dataclass
class _Targets:
    """A layer's fixed targets: simulated activations of the constrained neurons on training rows."""

    neurons: torch.Tensor          # [k] constrained neuron indices
    scale: torch.Tensor            # [k]
    rows: torch.Tensor             # [n] training rows of the labeling tokens
    target: torch.Tensor           # [n, pos, k] activations the labels predict
    weight: torch.Tensor           # [n, pos, k] 1 where a token enters the match term
    heldout_rows: torch.Tensor
    heldout_target: torch.Tensor
    heldout_weight: torch.Tensor
    errors: list[str]

    def save(self, path: Path) -> None:
        t = {k: getattr(self, k) for k in ("neurons", "scale", "rows", "target", "weight", "heldout_rows",
                                           "heldout_target", "heldout_weight")}
        write_safetensors(path, t, {"kind": "build_interpretable_targets", "errors": self.errors})

    @classmethod
    def load(cls, path: Path) -> _Targets:
        t, meta = read_safetensors(path, writer="build_interpretable (start it again)")
        with reading(path, "build_interpretable (start it again)"):
            return cls(**t, errors=list(meta.get("errors", [])))


def _make_targets(model: Any, layer: int, labels: Labels, labeled: list[int], keep_free: int, simulator: Simulator,
                  tokens: torch.Tensor, mask: torch.Tensor | None, strs: list[list[str]], valid: torch.Tensor,
                  real: torch.Tensor, train_rows: torch.Tensor, heldout_rows: torch.Tensor) -> _Targets:
    """Choose the constrained neurons, simulate them from their labels, map predictions to activations."""
    names = [neuron_name(layer, i) for i in labeled]
    ok = [i for i, n in zip(labeled, names, strict=True) if labels[n].ok]
    # the worst-labeled neurons stay free: the messy remainder the labels do not explain
    order = sorted(ok, key=lambda i: (labels[neuron_name(layer, i)].score
                                      if labels[neuron_name(layer, i)].score is not None else -np.inf, i))
    constrained = sorted(order[keep_free:])
    idx = torch.tensor(constrained, dtype=torch.long)
    all_acts = _acts(model, layer, tokens, mask, idx)
    scale = all_acts.masked_fill(~valid[..., None], -torch.inf).amax((0, 1)).clamp_min(0.0)
    scale = scale.clamp_min(max(1e-2 * float(scale.max()) if len(scale) else 0.0, 1e-6))
    rows = torch.cat([train_rows, heldout_rows])
    contexts = [[s for s, r in zip(strs[int(row)], real[int(row)].tolist(), strict=True) if r] for row in rows]
    texts = []
    for i in constrained:
        lab = labels[neuron_name(layer, i)]
        texts.append(lab.text + (f" (negative: {lab.negative_text})" if lab.negative_text else ""))
    preds, errs = _simulate(simulator, texts, contexts) if constrained else ([], [])
    n = len(train_rows)
    target, weight = _grid([p[:n] for p in preds], train_rows, tokens, real, scale)
    h_target, h_weight = _grid([p[n:] for p in preds], heldout_rows, tokens, real, scale)
    vt, vh = valid[train_rows][..., None].float(), valid[heldout_rows][..., None].float()
    errors = [f"{neuron_name(layer, i)}: {e}" for i, e in zip(constrained, errs, strict=True) if e]
    return _Targets(neurons=idx, scale=scale, rows=train_rows, target=target, weight=weight * vt,
                    heldout_rows=heldout_rows, heldout_target=h_target, heldout_weight=h_weight * vh, errors=errors)


def _acts(model: Any, layer: int, tokens: torch.Tensor, mask: torch.Tensor | None, idx: torch.Tensor,
          batch_size: int = 64) -> Float[torch.Tensor, "batch pos k"]:
    """Activations of neurons ``idx`` of ``layer`` (no grad), batched."""
    hook = act_name("post", layer)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, tokens.shape[0], batch_size):
            kw = {"attention_mask": mask[s:s + batch_size].to(device)} if mask is not None else {}
            _, cache = run_with_cache(model, tokens[s:s + batch_size].to(device), names_filter=hook,
                                            stop_at_layer=layer + 1, return_type=None, **kw)
            out.append(cache[hook][..., idx.to(device)].float().cpu())
    return torch.cat(out)


def _simulate(simulator: Simulator, texts: list[str], contexts: list[list[str]]) -> tuple[list[list], list[str]]:
    """All units' simulations concurrently (an LLM simulator limits its own requests in flight)."""
    import asyncio

    async def one(text: str) -> tuple[list, str | None]:
        try:
            sim = await simulator.asimulate(text, contexts, signed=False)
        except LLMError as e:        # one unit's failure leaves it unconstrained, never stops the run
            return [None] * len(contexts), f"{type(e).__name__}: {e}"
        return list(sim.predictions), "; ".join(getattr(sim, "errors", [])[:2]) or None

    async def main() -> list[tuple[list, str | None]]:
        return await asyncio.gather(*(one(t) for t in texts))

    out = run_sync(main())
    return [p for p, _ in out], [e for _, e in out]


def _grid(preds: list[list], rows: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
          scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit predictions (0…10 over each row's real tokens) as activation targets and weights."""
    n, pos, k = len(rows), tokens.shape[1], len(preds)
    target, weight = torch.zeros(n, pos, k), torch.zeros(n, pos, k)
    for j, unit_preds in enumerate(preds):
        for c, p in enumerate(unit_preds):
            if p is None:
                continue
            where = valid[rows[c]].nonzero().flatten()     # the real tokens the simulator saw
            if len(p) != len(where):
                continue
            target[c, where, j] = torch.tensor(p, dtype=torch.float32) / 10.0 * scale[j]
            weight[c, where, j] = 1.0
    return target, weight
