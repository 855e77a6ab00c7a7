"""Scores of a label, from one simulation of its unit's held-out contexts.

The held-out contexts are the unit's top contexts and as many random ones (1:1). From the
simulator's per-token predictions:

- **correlation** — Pearson correlation of predicted and true activations pooled over all tokens of
  the contexts that were simulated (Bills et al. 2023's "all" score), with a bootstrap interval
  over contexts (resampled within the top and random halves). A constant prediction scores 0.
- **detection** — balanced accuracy of telling activating contexts (true peak at least 5 of 10 on
  the unit's scale) from the others by whether the predicted peak reaches 5. Random contexts that
  do activate count as activating: the question is whether the label predicts firing, not where a
  context was drawn from.
- **fuzzing** — balanced accuracy, within the top contexts, of picking out the tokens that fire
  (true level ≥ 5 of 10) from those that do not, by the predicted level ≥ 5. It asks the same
  question as highlight-fuzzing (does the label say *which* tokens fire?) from the one batched
  simulation, with no extra request.

Contexts whose simulation failed are counted in ``failed`` and left out, never scored as zeros.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tl_modular.labeling._evidence import Context, Evidence

LEVEL = 5.0   # the middle of the 0…10 prediction scale


@dataclass
class Score:
    correlation: float | None
    interval: tuple[float, float] | None
    detection: float | None
    fuzzing: float | None
    n_contexts: int
    failed: int

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["interval"] = list(self.interval) if self.interval is not None else None
        return d


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 2 or float(np.std(x)) == 0.0:
        return None                  # the truth does not vary: nothing to predict
    if float(np.std(y)) == 0.0:
        return 0.0                   # a constant prediction carries no information
    return float(np.corrcoef(x, y)[0, 1])


def _balanced(truth: np.ndarray, pred: np.ndarray) -> float | None:
    if truth.all() or not truth.any():
        return None
    return float(0.5 * (pred[truth].mean() + (~pred[~truth]).mean()))


def _bootstrap(true: list[np.ndarray], pred: list[np.ndarray], top: np.ndarray, n_boot: int, seed: int
               ) -> tuple[float, float] | None:
    """95% interval of the pooled correlation over contexts resampled within the top and random
    halves — from per-context sums, so every draw is one small matrix product."""
    stats = np.array([[t.size, t.sum(), p.sum(), (t * t).sum(), (p * p).sum(), (t * p).sum()]
                      for t, p in zip(true, pred, strict=True)])
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(true)))
    for group in (np.flatnonzero(top), np.flatnonzero(~top)):
        if group.size:
            draws = rng.integers(0, group.size, size=(n_boot, group.size))
            np.add.at(counts, (np.arange(n_boot)[:, None], group[draws]), 1.0)
    n, sx, sy, sxx, syy, sxy = (counts @ stats).T
    with np.errstate(invalid="ignore", divide="ignore"):
        vx, vy = sxx - sx * sx / n, syy - sy * sy / n
        r = (sxy - sx * sy / n) / np.sqrt(vx * vy)
    r = np.where((vy <= 1e-12 * np.maximum(syy, 1e-300)) & (vx > 0), 0.0, r)   # constant prediction: 0, as above
    r = r[np.isfinite(r)]
    if r.size == 0:
        return None
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def holdout(ev: Evidence) -> tuple[list[Context], np.ndarray]:
    """The contexts a label is scored on and whether each is a top context."""
    contexts = ev.holdout_top + ev.holdout_random
    return contexts, np.array([True] * len(ev.holdout_top) + [False] * len(ev.holdout_random))


def score(ev: Evidence, predictions: list[list[float] | None], *, n_boot: int = 200, seed: int = 0) -> Score:
    """Scores of ``predictions`` for the held-out contexts of ``ev`` (in :func:`holdout`'s order)."""
    contexts, is_top = holdout(ev)
    if len(predictions) != len(contexts):
        raise ValueError(f"{len(predictions)} predictions for {len(contexts)} held-out contexts")
    ok = [i for i, p in enumerate(predictions) if p is not None]
    failed = len(contexts) - len(ok)
    if not ok:
        return Score(None, None, None, None, len(contexts), failed)
    true = [np.asarray(contexts[i].acts, dtype=float) for i in ok]
    pred = [np.asarray(predictions[i], dtype=float) for i in ok]
    top = is_top[ok]
    corr = _pearson(np.concatenate(true), np.concatenate(pred))

    interval = None
    if corr is not None and n_boot > 0 and len(ok) > 2:
        interval = _bootstrap(true, pred, top, n_boot, seed)

    off, scale = ev.offset, ev.scale
    active = np.array([10 * (t.max() - off) / scale >= LEVEL for t in true])
    detection = _balanced(active, np.array([p.max() >= LEVEL for p in pred]))
    tok_true = np.concatenate([10 * (t - off) / scale >= LEVEL for t, is_t in zip(true, top, strict=True) if is_t]
                              or [[]])
    tok_pred = np.concatenate([p >= LEVEL for p, is_t in zip(pred, top, strict=True) if is_t] or [[]])
    fuzzing = _balanced(tok_true.astype(bool), tok_pred.astype(bool)) if tok_true.size else None
    return Score(corr, interval, detection, fuzzing, len(contexts), failed)


def baseline_summary(correlations: list[float], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean correlation of random (another unit's) labels, with a bootstrap interval over units."""
    vals = np.asarray([c for c in correlations if c is not None], dtype=float)
    if vals.size == 0:
        return {"n": 0, "mean": None, "interval": None}
    rng = np.random.default_rng(seed)
    means = [float(rng.choice(vals, size=vals.size).mean()) for _ in range(n_boot)]
    return {"n": int(vals.size), "mean": float(vals.mean()),
            "interval": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}
