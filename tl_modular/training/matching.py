"""Matching a layer's neurons to their labels: the match term trained on, and what each phase
measures (fixed-label fidelity, match loss, label scores, the original loss and accuracy)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tl_modular._hooks import hook_guard
from tl_modular._names import act_name, neuron_name
from tl_modular.labeling import Labels
from tl_modular.tasks.task import Task
from tl_modular.training.targets import _acts, _Targets
from tl_modular.training.trainer import evaluate, task_loss


class _Match:
    """The match term: ``mean((act - target)² / scale²)`` over a random batch of the training contexts,
    from a forward pass that stops after the layer."""

    def __init__(self, layer: int, t: _Targets, tokens: torch.Tensor, mask: torch.Tensor | None, batch: int,
                 seed: int, device: torch.device) -> None:
        self.layer, self.t, self.batch, self.device = layer, t, batch, device
        self.tokens = tokens[t.rows].to(device)
        self.mask = mask[t.rows].to(device) if mask is not None else None
        self.seed, self.calls = seed, 0
        self.target, self.weight = t.target.to(device), t.weight.to(device)
        self.inv_scale2 = (1.0 / t.scale.to(device) ** 2)
        self.idx = t.neurons.to(device)

    def __call__(self, model: Any) -> torch.Tensor:
        n = self.tokens.shape[0]
        # one seed per call: a resumed phase (``calls`` set to its step) draws the batches it would have drawn
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        pick = torch.randperm(n, generator=gen)[:self.batch].to(self.device)
        got: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor, hook: Any) -> torch.Tensor:
            got["act"] = act
            return act

        kw = {"attention_mask": self.mask[pick]} if self.mask is not None else {}
        with hook_guard(model), model.hooks(fwd_hooks=[(act_name("post", self.layer), keep)]):
            model(self.tokens[pick], stop_at_layer=self.layer + 1, **kw)
        act = got["act"][..., self.idx]
        w = self.weight[pick]
        return ((act - self.target[pick]) ** 2 * self.inv_scale2 * w).sum() / w.sum().clamp_min(1.0)


def _measure(model: Any, layer: int, t: _Targets, tokens: torch.Tensor, mask: torch.Tensor | None,
             eval_sets: Mapping[str, Task], when: str) -> dict[str, Any]:
    def pick(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return tokens[rows], (mask[rows] if mask is not None else None)

    act = _acts(model, layer, *pick(t.rows), t.neurons)
    fid = {f"train_{when}": _mean(_pearson(act, t.target, t.weight))}
    w = t.weight
    fid_match = float(((act - t.target) ** 2 / t.scale ** 2 * w).sum() / w.sum().clamp_min(1))
    if len(t.heldout_rows):
        h_act = _acts(model, layer, *pick(t.heldout_rows), t.neurons)
        fid[f"heldout_{when}"] = _mean(_pearson(h_act, t.heldout_target, t.heldout_weight))
    else:
        fid[f"heldout_{when}"] = None
    loss, acc = _original(model, eval_sets)
    return {"fidelity": fid, "match": {when: fid_match}, "loss": {when: loss}, "accuracy": {when: acc}}


def _pearson(act: torch.Tensor, pred: torch.Tensor, w: torch.Tensor) -> list[float | None]:
    """Per-neuron Pearson correlation over the weighted tokens (``[n, pos, k]`` each); None where the
    activation is constant, 0 where the prediction is (as the label scores count it)."""
    m = w.sum((0, 1)).double()
    a, p, w = act.double(), pred.double(), w.double()
    ma, mp = (w * a).sum((0, 1)) / m.clamp_min(1), (w * p).sum((0, 1)) / m.clamp_min(1)
    da, dp = (a - ma) * w, (p - mp) * w
    va, vp, cov = (da * da).sum((0, 1)), (dp * dp).sum((0, 1)), (da * dp).sum((0, 1))
    out: list[float | None] = []
    for j in range(a.shape[-1]):
        if m[j] < 2 or va[j] <= 1e-24:
            out.append(None)
        elif vp[j] <= 1e-24:
            out.append(0.0)
        else:
            out.append(float(cov[j] / (va[j] * vp[j]).sqrt()))
    return out


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(vals)) if vals else None


def _summary(labels: Labels, idx: Sequence[int], layer: int) -> dict[str, Any]:
    vals = [labels[neuron_name(layer, i)].score for i in idx]
    vals = [v for v in vals if v is not None]
    return {"mean": float(np.mean(vals)) if vals else None, "median": float(np.median(vals)) if vals else None,
            "n": len(vals)}


def _original(model: Any, eval_sets: Mapping[str, Task]) -> tuple[float, dict[str, float]]:
    """Mean cross-entropy over the evaluation tasks at their scored positions, and accuracy per task."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = []
            for t in eval_sets.values():
                parts = [(float(task_loss(model, t[s:s + 256].to(device))), len(t[s:s + 256]))
                         for s in range(0, len(t), 256)]
                losses.append(sum(v * n for v, n in parts) / sum(n for _, n in parts))
        acc = evaluate(model, eval_sets)
    finally:
        model.train(was)
    return float(np.mean(losses)), acc
