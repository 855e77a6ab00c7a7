"""Verified ground truth about a workbench model: its known heads, routes and per-task needs.

These are the facts later stages are tested against (module and circuit finding):

- :func:`head_scores`: TransformerLens' ``head_detector`` scores for previous-token and
  induction heads, on periodic random sequences of the toy vocabulary;
- :func:`known_heads`: the best previous-token head (layer 0) and induction head (a later
  layer); :func:`induction_heads`: every later head whose induction score reaches 0.5;
- :func:`induction_path_fraction`: the share of the induction task's logit difference on the path
  previous-token head -> induction heads' keys (path patching as in Wang et al.: attention heads in
  between stay clean, the MLP in between is part of the path and recomputed);
  :func:`induction_route_fraction`: the share of the single direct edge to the top induction
  head's key; :func:`key_composition_fraction`: the previous-token head's and its layer's MLP's
  writes into every later key, patched together;
- :func:`ablation_accuracy`: accuracy per task with each head or MLP mean-ablated.

>>> model = tlm.toy.load_model()                   # doctest: +SKIP
>>> known_heads(model)                             # doctest: +SKIP
{'previous_token': 'L0.H3', 'induction': 'L1.H6'}
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from tl_modular._names import head_name
from tl_modular.patching import mean_writes, patch_channels, path_effect, route_effect
from tl_modular.segmentation import segment
from tl_modular.tasks.task import Task
from tl_modular.toy.generators import GENERATORS, induction
from tl_modular.toy.vocab import N_NUMBERS, TASK_TOKENS, VOCAB

__all__ = ["ablation_accuracy", "detection_sequences", "head_scores", "induction_heads", "induction_path_fraction",
           "induction_route_fraction", "key_composition_fraction", "known_heads"]


def detection_sequences(n: int = 32, *, seed: int = 0, period: int = 8, length: int = 31) -> list[str]:
    """Periodic random sequences ``IND x1..xk x1..xk x1..`` for TransformerLens' head detector.

    Most rows of such a sequence have an earlier occurrence of their token, so an induction
    head has a target on most rows (on the first period it has none and attends to the task
    token, which the scoring excludes).
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = [VOCAB[i] for i in rng.sample(range(N_NUMBERS), period)]
        body = (x * (length // period + 1))[:length - 1]
        out.append(" ".join([TASK_TOKENS["induction"], *body]))
    return out


@torch.no_grad()
def head_scores(model: Any, sequences: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``head_detector`` scores ``[n_layers, n_heads]`` for previous-token and induction heads.

    Scored with ``exclude_bos=True``: every toy sequence starts with its task token, which heads
    use as an attention sink the way language models use BOS. The model needs the toy
    tokenizer (``load_model`` sets it).
    """
    from transformer_lens.head_detector import detect_head

    sequences = detection_sequences() if sequences is None else sequences
    return {kind: detect_head(model, sequences, f"{kind}_head", exclude_bos=True)
            for kind in ("previous_token", "induction")}


def known_heads(model: Any, scores: Mapping[str, torch.Tensor] | None = None) -> dict[str, str]:
    """The strongest previous-token head of layer 0 and induction head of the later layers."""
    scores = head_scores(model) if scores is None else scores
    prev = int(scores["previous_token"][0].argmax())
    later = scores["induction"][1:]
    layer, head = divmod(int(later.argmax()), later.shape[1])
    return {"previous_token": head_name(0, prev), "induction": head_name(layer + 1, head)}


def induction_heads(model: Any, scores: Mapping[str, torch.Tensor] | None = None, *,
                    threshold: float = 0.5) -> list[str]:
    """Every head after layer 0 whose induction score reaches ``threshold``, strongest first."""
    scores = head_scores(model) if scores is None else scores
    ind = scores["induction"]
    found = [(float(ind[layer, h]), head_name(layer, h)) for layer in range(1, ind.shape[0])
             for h in range(ind.shape[1]) if ind[layer, h] >= threshold]
    return [name for _, name in sorted(found, reverse=True)]


@torch.no_grad()
def induction_path_fraction(model: Any, previous_token: str | None = None, heads: list[str] | None = None, *,
                            n: int = 512, seed: int = 123) -> float:
    """Fraction of the induction logit difference on the path previous-token head -> the induction
    heads' keys, the MLP in between recomputed as part of the path (attention heads stay clean)."""
    previous_token = previous_token or known_heads(model)["previous_token"]
    heads = induction_heads(model) if heads is None else heads
    return path_effect(model, induction(n, seed=seed), previous_token, [f"{h}:k" for h in heads]).fraction


@torch.no_grad()
def induction_route_fraction(model: Any, heads: Mapping[str, str] | None = None, *, n: int = 512,
                             seed: int = 123) -> float:
    """Fraction of the induction task's logit difference carried by the direct route from the
    previous-token head to the induction head's keys (path patching, clean vs corrupted)."""
    heads = known_heads(model) if heads is None else heads
    route = (heads["previous_token"], heads["induction"] + ":k")
    return route_effect(model, induction(n, seed=seed), [route]).fraction


@torch.no_grad()
def key_composition_fraction(model: Any, heads: Mapping[str, str] | None = None, *, n: int = 512,
                             seed: int = 123) -> float:
    """Fraction of the induction logit difference carried by the previous-token head's write
    into the keys of every later-layer head, directly and through the MLP it feeds (the routes
    previous-token head -> keys and that layer's MLP -> keys, patched together)."""
    heads = known_heads(model) if heads is None else heads
    channels = segment(model)
    prev = channels[heads["previous_token"]]
    senders = [prev.name] + [c.name for c in channels.of_kind("mlp") if c.layer == prev.layer]
    keys = [f"{c.name}:k" for c in channels.of_kind("head") if c.layer > prev.layer]
    return route_effect(model, induction(n, seed=seed), [(s, k) for s in senders for k in keys]).fraction


@torch.no_grad()
def ablation_accuracy(model: Any, tasks: Mapping[str, Task] | None = None, *, n: int = 512,
                      seed: int = 321) -> dict[str, dict[str, float]]:
    """Accuracy per task with each head and MLP mean-ablated (its write replaced by its mean
    per position over the task's clean prompts). Key ``"none"`` is the intact model."""
    tasks = tasks or {name: gen(n, seed=seed) for name, gen in GENERATORS.items()}
    channels = segment(model)
    names = [c.name for c in channels.of_kind("head", "mlp")]
    out: dict[str, dict[str, float]] = {"none": {t: task.accuracy(model(task.clean)) for t, task in tasks.items()}}
    means = {t: mean_writes(model, channels, task.clean, names) for t, task in tasks.items()}
    for name in names:
        out[name] = {t: task.accuracy(patch_channels(model, channels, task.clean, [name], means[t]))
                     for t, task in tasks.items()}
    return out
