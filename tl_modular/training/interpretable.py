"""Building a network around its own labels: label → simulate → match → freeze, layer by layer.

For each chosen layer, in order, :func:`build_interpretable`

1. labels the layer's MLP neurons (:func:`tl_modular.labeling.label`; their held-out scores are
   the *before* scores),
2. simulates each neuron's activations from its label alone on a bounded set of training contexts
   (rows of the labeling's explanation split) and keeps the predictions as fixed targets,
3. trains with ``loss = task loss + match_weight * mean((act - target)² / scale²)`` over the
   constrained neurons, through the workbench's training loop (:func:`tl_modular.toy.train`, its
   ``extra_loss`` hook),
4. freezes the layer and everything upstream of it, re-labels the layer (the *after* scores) and
   moves on.

Targets. A simulator predicts on the 0…10 scale on which the labeler was shown activations
(10 = the unit's largest shown activation). A prediction ``p`` maps back to the activation
``p / 10 * scale``, with ``scale`` the neuron's largest activation on the labeling tokens
(position 0 and padding excluded; floored at 1% of the layer's largest, so a dead neuron's
term stays bounded). The match term divides by ``scale²``, so every neuron weighs alike
whatever its range.

What to read. The match term falls both when neurons follow their labels and when they merely
quiet down where their labels predict nothing; the *fidelity* — the correlation of the fixed
labels' simulations with the activations, on the training contexts and on held-out rows — only
rises with the former, and the re-labeled scores say whether the labels got better. All three are
reported per layer, with the original loss and per-task accuracy.

Freezing. A neuron's activation is computed by the embeddings and every block up to its own
layer's attention, LayerNorms and ``W_in``/``b_in``; its label only stays true if none of them
moves afterwards. So freezing layer ``L`` sets ``requires_grad=False`` on the embeddings and all
parameters of blocks ``0..L`` — including layer ``L``'s attention and its ``W_out``/``b_out`` (the
neurons' writes belong to the labeled layer). Later layers, ``ln_final`` and the unembedding keep
training on the original objective. After freezing, the layer's activations are bit-identical on
any input, so its *after* labels are final. ``keep_free`` neurons (the layer's worst-labeled ones)
are left out of the match term; they are free only while their layer trains (they can absorb what
the constrained neurons no longer compute), and freeze with it.

>>> result = build_interpretable(tlm.toy.load_model(), None, steps_per_layer=200)     # doctest: +SKIP
>>> print(result.to_markdown())                                                        # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tl_modular import labeling
from tl_modular._aio import run_sync
from tl_modular._hooks import hook_guard, run_with_cache
from tl_modular._io import (
    SCHEMA_VERSION,
    bind_files,
    check_bound,
    read_json,
    read_safetensors,
    read_safetensors_header,
    read_versioned_json,
    reading,
    write_json,
    write_safetensors,
)
from tl_modular._names import act_name, hook_layer, layer_name, neuron_name
from tl_modular._tokens import check_tokens, valid_positions
from tl_modular.labeling import Labeler, Labels, LLMError, Simulator
from tl_modular.tasks.task import Task
from tl_modular.training.trainer import evaluate, task_loss

__all__ = ["BuildConfig", "BuildResult", "LayerRecord", "build_interpretable", "lm_task"]

_SCHEMA = "tl_modular.build_interpretable"
_STATE = "build_state.json"
_MODEL = "model.safetensors"
# Fields that may change on resume: they do not alter what is computed.
_FREE_ON_RESUME = ("eval_every", "checkpoint_every")


@dataclass(kw_only=True)
class BuildConfig:
    """Settings of :func:`build_interpretable` (validated).

    Attributes:
        layers: Layers to build, in order: ``None`` every layer, an int that layer and all after
            it, or a sequence of layers.
        steps_per_layer: Training steps while a layer is matched to its labels.
        match_weight: Weight of the match term against the task loss.
        keep_free: Neurons per layer left out of the match term (the worst-labeled ones).
        neurons: Label and constrain only the first ``neurons`` neurons of each layer (``None``: all);
            the others train freely like ``keep_free`` ones.
        n_contexts: Training contexts simulated per layer (rows of the labeling's explanation split):
            the simulator's cost per neuron is bounded by this.
        n_heldout: Held-out rows simulated too, for the fixed-label correlation on unseen data (0: skip).
        match_batch: Contexts per step in the match term.
        final_steps: Steps on the original objective alone after the last layer is frozen.
        lr, batch_size, warmup, weight_decay, eval_every, seed: Passed to :func:`tl_modular.toy.train`
            for every phase (a fresh optimizer and schedule per phase). Weight decay is off by
            default: in a short fine-tune it only adds drift unrelated to the labels.
        checkpoint_every: Steps between the phase checkpoints (with ``checkpoint_dir``).
        n_label_rows: Rows per task drawn for the labeling tokens when ``tokens`` is not given.
        n_boot: Bootstrap samples for the label scores' intervals (0: none; they are costly).
        evidence: The :class:`tl_modular.labeling.EvidenceConfig` of every labeling.
    """

    layers: int | Sequence[int] | None = None
    steps_per_layer: int = 200
    match_weight: float = 1.0
    keep_free: int = 0
    neurons: int | None = None
    n_contexts: int = 128
    n_heldout: int = 64
    match_batch: int = 32
    final_steps: int = 0
    lr: float = 3e-4
    batch_size: int = 64
    warmup: int = 20
    weight_decay: float = 0.0
    eval_every: int = 50
    checkpoint_every: int = 100
    n_label_rows: int = 64
    n_boot: int = 0
    evidence: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps_per_layer", "n_contexts", "match_batch", "batch_size", "eval_every",
                     "checkpoint_every", "n_label_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BuildConfig.{name} must be a positive int, got {v!r}")
        for name in ("keep_free", "n_heldout", "final_steps", "warmup", "n_boot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"BuildConfig.{name} must be an int >= 0, got {v!r}")
        if not (isinstance(self.match_weight, (int, float)) and math.isfinite(self.match_weight)
                and self.match_weight >= 0):
            raise ValueError(f"BuildConfig.match_weight must be a finite number >= 0, got {self.match_weight!r}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"BuildConfig needs lr > 0 and weight_decay >= 0, got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}")
        if self.neurons is not None and (isinstance(self.neurons, bool) or int(self.neurons) < 1):
            raise ValueError(f"BuildConfig.neurons must be None or a positive int, got {self.neurons!r}")
        if self.neurons is not None and self.keep_free >= self.neurons:
            raise ValueError(f"keep_free={self.keep_free} leaves none of the {self.neurons} labeled neurons "
                             "constrained; lower keep_free or raise neurons")
        if self.layers is not None and not isinstance(self.layers, int):
            layers = list(self.layers)
            if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise ValueError(f"BuildConfig.layers must be None, an int or a non-empty sequence of ints, "
                                 f"got {self.layers!r}")
            self.layers = tuple(sorted(set(layers)))
        if self.evidence is None:
            from tl_modular.labeling import EvidenceConfig
            self.evidence = EvidenceConfig(seed=self.seed)

    def resolve_layers(self, n_layers: int) -> list[int]:
        """The layers to build, checked against the model's ``n_layers``."""
        if self.layers is None:
            layers = list(range(n_layers))
        elif isinstance(self.layers, int):
            layers = list(range(self.layers, n_layers))
        else:
            layers = list(self.layers)
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad or not layers:
            raise ValueError(f"layers {self.layers!r} name no valid layer of a {n_layers}-layer model "
                             f"(bad: {bad}); choose layers in 0..{n_layers - 1}")
        return layers

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "evidence"}
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        d["evidence"] = dict(vars(self.evidence))
        return d


@dataclass
class LayerRecord:
    """What happened to one layer.

    Attributes:
        layer: The layer.
        labeled, constrained, free: Neuron indices labeled, matched to their labels, and left free
            (``keep_free``, failed labels or simulations).
        scores: Label scores (held-out correlation, :mod:`tl_modular.labeling`) of the constrained
            neurons: ``{"before": {"mean", "median", "n"}, "after": {...}}``; ``free_scores`` alike.
        fidelity: Mean correlation of the *fixed* labels' simulations with the neurons' activations,
            ``{"train_before", "train_after", "heldout_before", "heldout_after"}`` — did the neurons
            come to do what their labels say, on the training contexts and on held-out rows.
        match_loss: The match term on all training contexts, ``{"before", "after"}``.
        loss, accuracy: The original loss (mean cross-entropy over the evaluation tasks) and
            per-task accuracy, ``{"before", "after"}``.
        frozen: Parameter names frozen after this layer (cumulative).
        history: The phase's training history (:func:`tl_modular.toy.train` records).
        labels_before, labels_after: The :class:`tl_modular.labeling.Labels` themselves.
    """

    layer: int
    labeled: list[int]
    constrained: list[int]
    free: list[int]
    scores: dict[str, Any] = field(default_factory=dict)
    free_scores: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, float | None] = field(default_factory=dict)
    match_loss: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    labels_before: Any = field(default=None, repr=False)
    labels_after: Any = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("labels_before", "labels_after")}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LayerRecord:
        known = set(cls.__dataclass_fields__) - {"labels_before", "labels_after"}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class BuildResult:
    """What :func:`build_interpretable` returns: the built model (a copy) and one record per layer."""

    model: Any
    layers: list[LayerRecord]
    initial: dict[str, Any]
    final: dict[str, Any]
    config: BuildConfig
    final_history: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, layer: int) -> LayerRecord:
        for r in self.layers:
            if r.layer == layer:
                return r
        raise KeyError(f"layer {layer} was not built; built: {[r.layer for r in self.layers]}")

    def to_json(self) -> dict[str, Any]:
        return {"schema": _SCHEMA, "version": SCHEMA_VERSION, "config": self.config.to_json(),
                "initial": self.initial, "final": self.final, "layers": [r.to_json() for r in self.layers],
                "final_history": self.final_history}

    def to_markdown(self) -> str:
        """Per layer: label scores and fixed-label fidelity before → after, match loss, original loss."""
        def f(x: Any) -> str:
            return "–" if x is None else f"{x:.3f}"

        def g(x: Any) -> str:      # losses span orders of magnitude
            return "–" if x is None else f"{x:.3g}"
        rows = ["| layer | constrained | label score (mean) | label score (median) | fidelity (train) | "
                "fidelity (held-out) | match loss | original loss |", "|---|---|---|---|---|---|---|---|"]
        for r in self.layers:
            b, a = r.scores.get("before", {}), r.scores.get("after", {})
            fd, m, lo = r.fidelity, r.match_loss, r.loss
            rows.append(f"| {r.layer} | {len(r.constrained)} | {f(b.get('mean'))} → {f(a.get('mean'))} | "
                        f"{f(b.get('median'))} → {f(a.get('median'))} | {f(fd.get('train_before'))} → "
                        f"{f(fd.get('train_after'))} | {f(fd.get('heldout_before'))} → {f(fd.get('heldout_after'))}"
                        f" | {g(m.get('before'))} → {g(m.get('after'))} | {g(lo.get('before'))} → "
                        f"{g(lo.get('after'))} |")
        return "\n".join(rows)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``result.json``, the model (``model.safetensors``) and each layer's labels (atomic)."""
        directory = Path(directory)
        # the model first, result.json last binding it (no reader mixes two saves)
        write_safetensors(directory / _MODEL, self.model.state_dict(), {"kind": "build_interpretable_model",
                                                                        "bound_to": "result.json"})
        write_json(directory / "result.json", {**self.to_json(), "files": bind_files(directory, [_MODEL])})
        for r in self.layers:
            for when in ("before", "after"):
                labels = getattr(r, f"labels_{when}")
                if labels is not None:
                    labels.save(directory / layer_name(r.layer) / f"labels_{when}.json")
        return directory


def lm_task(tokens: Int[torch.Tensor, "batch pos"], name: str = "lm") -> Task:
    """Next-token prediction at every position of ``tokens`` as a :class:`~tl_modular.task.Task`
    (metric ``logprob``), so that plain token data trains through the workbench's loop."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be a [batch, pos >= 2] integer tensor, got {getattr(tokens, 'shape', tokens)}")
    pos = torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1)
    return Task(name=name, clean=tokens, corrupted=tokens, positions=pos.clone(), answers=tokens[:, 1:].clone(),
                metric_kind="logprob")


# --- pieces -------------------------------------------------------------------------------------

def _frozen_names(model: Any, layer: int) -> list[str]:
    """Everything upstream of layer ``layer``'s neurons, and the layer itself (see the module docs)."""
    out = []
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            if hook_layer(name) <= layer:          # parameters are named like hooks: blocks.{l}....
                out.append(name)
        elif not name.startswith(("unembed", "ln_final")):
            out.append(name)          # embeddings (token, positional)
    return out


def _freeze(model: Any, names: Sequence[str]) -> None:
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(False)


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


# --- the loop -----------------------------------------------------------------------------------

def build_interpretable(
    model: Any,
    data: Task | Sequence[Task] | Mapping[str, Task] | Int[torch.Tensor, "batch pos"] | None,
    labeler: Labeler | None = None,
    simulator: Simulator | None = None,
    *,
    tokens: Int[torch.Tensor, "batch pos"] | None = None,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    eval_sets: Mapping[str, Task] | None = None,
    config: BuildConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **options: Any,
) -> BuildResult:
    """Build ``model`` layer by layer around its own neurons' labels (see the module docs).

    Args:
        model: A ``HookedTransformer``; left unchanged (the loop trains a deep copy, returned in the result).
        data: The original objective: tasks for :func:`tl_modular.toy.train`, a ``[batch, pos]`` token
            tensor (next-token prediction on every position, :func:`lm_task`), or ``None`` for the
            workbench's four-task mix.
        labeler, simulator: As in :func:`tl_modular.labeling.label` (default: the offline pair, no LLM).
            With an LLM simulator each neuron costs one request per phase for its ``n_contexts`` +
            ``n_heldout`` rows; the predictions are kept as fixed targets.
        tokens: Rows the neurons are labeled on (and whose explanation split gives the training
            contexts); default: ``n_label_rows`` prompts per task of ``data`` (or the rows of a
            token tensor ``data``).
        attention_mask: The mask of ``tokens`` (padding is left out of labels, targets and fidelity).
        eval_sets: Tasks for the original loss and accuracy (default: :func:`tl_modular.toy.eval_tasks`
            for the task mix, else the first 512 examples of each task of ``data``).
        config: A :class:`BuildConfig`; ``**options`` override its fields.
        checkpoint_dir: Resumable: each finished layer (model, labels, record) and the running phase's
            training state are saved here; a re-run with the same settings continues where it stopped.
        progress: Progress bars.

    Returns:
        :class:`BuildResult` — the built model (its frozen parameters keep ``requires_grad=False``),
        per-layer :class:`LayerRecord` and the original loss and accuracy before and after.

    Raises:
        TypeError: the model is not a ``HookedTransformer``, or ``data`` is of another kind.
        ValueError: bad settings, layers the model lacks, an attention-only model, a checkpoint of
            another run.

    >>> res = build_interpretable(toy.load_model(), None, layers=[1], steps_per_layer=100)   # doctest: +SKIP
    >>> res[1].scores["before"]["mean"], res[1].scores["after"]["mean"]                      # doctest: +SKIP
    """
    from transformer_lens import HookedTransformer

    base = {f.name: getattr(config, f.name) for f in fields(config)} if config is not None else {}
    cfg = BuildConfig(**{**base, **options})
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"build_interpretable trains a transformer_lens.HookedTransformer, got {type(model).__name__}; "
                        "a TransformerBridge has no stop_at_layer, which the match term needs")
    if model.cfg.attn_only:
        raise ValueError("the model is attention-only: it has no MLP neurons to label and constrain")
    layers = cfg.resolve_layers(model.cfg.n_layers)
    labeler, simulator = _labeling_pair(labeler, simulator)
    tasks, tokens, attention_mask, eval_sets = _objective(data, tokens, attention_mask, eval_sets, cfg)
    rows = _LabelRows.choose(model, tokens, attention_mask, cfg)
    run = _Build(cfg=cfg, work=copy.deepcopy(model), tasks=tasks, eval_sets=eval_sets, labeler=labeler,
                 simulator=simulator, rows=rows, root=Path(checkpoint_dir) if checkpoint_dir is not None else None,
                 progress=progress)
    done, initial = run.resume()
    bar = tqdm(total=len(layers), initial=len(done), desc="build_interpretable", disable=not progress, leave=False)
    try:
        for layer in layers[len(done):]:
            done.append(run.layer(layer))
            if run.root is not None:
                _checkpoint(run.root, run.work, cfg, initial, done)
            bar.update(1)
        final_history = run.final_training()
    finally:
        bar.close()
        run.work.eval()
    loss1, acc1 = _original(run.work, eval_sets)
    return BuildResult(model=run.work, layers=done, initial=initial, final={"loss": loss1, "accuracy": acc1},
                       config=cfg, final_history=final_history)


# --- the steps of build_interpretable ------------------------------------------------------------

def _labeling_pair(labeler: Labeler | None, simulator: Simulator | None) -> tuple[Labeler, Simulator]:
    """The labeler and simulator (default: the offline pair; a labeler that simulates is its own simulator)."""
    labeler = labeler if labeler is not None else labeling.OfflineLabeler()
    if simulator is None:
        simulator = labeler if isinstance(labeler, labeling.Simulator) else labeling.OfflineSimulator()
    if not isinstance(simulator, labeling.Simulator):
        raise TypeError(f"simulator must implement asimulate(label, contexts, signed=) (the Simulator protocol), "
                        f"got {type(simulator).__name__}")
    return labeler, simulator


def _objective(data: Task | Sequence[Task] | Mapping[str, Task] | torch.Tensor | None, tokens: torch.Tensor | None,
               attention_mask: torch.Tensor | None, eval_sets: Mapping[str, Task] | None, cfg: BuildConfig
               ) -> tuple[list[Task] | None, torch.Tensor, torch.Tensor | None, Mapping[str, Task]]:
    """The original objective by the kind of ``data`` (tasks, ``None`` for the workbench's mix), the
    labeling tokens (default: prompts of those tasks) and the evaluation tasks."""
    # the toy workbench supplies default data and imports this package's trainer: imported here, not at
    # module level, so that importing tl_modular.training does not load (or cycle through) tl_modular.toy
    from tl_modular.toy.generators import mixed_tokens
    from tl_modular.toy.recipe import eval_tasks

    tasks: list[Task] | None
    if isinstance(data, torch.Tensor):
        if attention_mask is not None and tokens is None and not bool(attention_mask.bool().all()):
            raise ValueError("token data with padding cannot train through the task loop (every position is "
                             "scored): pass unpadded rows as data, and padded labeling rows as tokens=")
        tasks = [lm_task(data)]
        default_tokens: tuple[torch.Tensor, torch.Tensor | None] = (data, attention_mask)
    elif data is None:
        tasks = None
        default_tokens = mixed_tokens(n_per_task=cfg.n_label_rows, seed=cfg.seed + 7)
    elif isinstance(data, (Task, Sequence, Mapping)):
        tasks = [data] if isinstance(data, Task) else (list(data.values()) if isinstance(data, Mapping) else list(data))
        if not tasks or not all(isinstance(t, Task) for t in tasks):
            raise TypeError("data must be a Task, a sequence or mapping of Tasks, a [batch, pos] token tensor, "
                            f"or None; got {type(data).__name__} holding {[type(t).__name__ for t in tasks][:3]}")
        default_tokens = mixed_tokens(tasks, n_per_task=cfg.n_label_rows, seed=cfg.seed + 7)
    else:
        raise TypeError(f"data must be a Task, a sequence or mapping of Tasks, a [batch, pos] token tensor, or None; "
                        f"got {type(data).__name__}")
    if tokens is None:
        tokens, attention_mask = default_tokens
    tokens, attention_mask = check_tokens(tokens, attention_mask)
    if eval_sets is None:
        eval_sets = eval_tasks() if tasks is None else {t.name: t[:512] for t in tasks}
    return tasks, tokens, attention_mask, eval_sets


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
class _Build:
    """One run of :func:`build_interpretable`: the model being built and what every layer needs."""

    cfg: BuildConfig
    work: Any                       # the deep copy being built
    tasks: list[Task] | None
    eval_sets: Mapping[str, Task]
    labeler: Labeler
    simulator: Simulator
    rows: _LabelRows
    root: Path | None
    progress: bool

    @property
    def train_opts(self) -> dict[str, Any]:
        c = self.cfg
        return {"lr": c.lr, "batch_size": c.batch_size, "warmup": c.warmup, "weight_decay": c.weight_decay,
                "eval_every": c.eval_every, "seed": c.seed}

    def resume(self) -> tuple[list[LayerRecord], dict[str, Any]]:
        """The layers an earlier run in ``root`` finished (frozen again, their labels re-read) and the
        original loss and accuracy before any training."""
        state = _resume(self.root, self.cfg, self.work)
        done: list[LayerRecord] = state["done"]
        for r in done:
            _freeze(self.work, r.frozen)
            if self.root is not None:
                r.labels_before = labeling.Labels.load(self.root / layer_name(r.layer) / "labels_before.json")
                r.labels_after = labeling.Labels.load(self.root / layer_name(r.layer) / "labels_after.json")
        initial = state.get("initial")
        if initial is None:
            loss0, acc0 = _original(self.work, self.eval_sets)
            initial = {"loss": loss0, "accuracy": acc0}
        return done, initial

    def label(self, layer: int) -> Labels:
        r = self.rows
        units = labeling.neurons(self.work, layer, indices=r.labeled)
        return labeling.label(units, self.work, r.tokens, labeler=self.labeler, simulator=self.simulator,
                              attention_mask=r.mask, evidence=self.cfg.evidence, n_boot=self.cfg.n_boot,
                              seed=self.cfg.seed, progress=self.progress)

    def targets(self, layer: int, phase: Path | None) -> tuple[Labels, _Targets, dict[str, Any]]:
        """Steps 1-2: labels, fixed targets and the measures before training (re-read on resume: an
        LLM's answers are not re-bought)."""
        r = self.rows
        if phase is not None and (phase / "targets.safetensors").exists():
            return (labeling.Labels.load(phase / "labels_before.json"), _Targets.load(phase / "targets.safetensors"),
                    read_json(phase / "start.json"))
        labels = self.label(layer)
        targets = _make_targets(self.work, layer, labels, r.labeled, self.cfg.keep_free, self.simulator, r.tokens,
                                r.mask, r.strs, r.valid, r.real, r.train, r.heldout)
        start = _measure(self.work, layer, targets, r.tokens, r.mask, self.eval_sets, "before")
        if phase is not None:
            labels.save(phase / "labels_before.json")
            targets.save(phase / "targets.safetensors")
            write_json(phase / "start.json", start)
        return labels, targets, start

    def layer(self, layer: int) -> LayerRecord:
        """One layer: label, simulate targets, train with the match term, freeze, measure, re-label."""
        from tl_modular.toy.recipe import train

        cfg, r = self.cfg, self.rows
        phase = self.root / layer_name(layer) if self.root is not None else None
        labels, targets, start = self.targets(layer, phase)
        # 3. train with the match term
        device = next(self.work.parameters()).device
        match = _Match(layer, targets, r.tokens, r.mask, cfg.match_batch, cfg.seed + layer, device)
        match.calls = _phase_step(phase)
        extra = (lambda m, f=match: cfg.match_weight * f(m)) if cfg.match_weight > 0 else None
        res = train(self.work, self.tasks, extra_loss=extra, eval_sets=self.eval_sets, checkpoint_dir=phase,
                    progress=self.progress, checkpoint_every=cfg.checkpoint_every, steps=cfg.steps_per_layer,
                    **self.train_opts)
        # 4. freeze, measure, re-label
        frozen = _frozen_names(self.work, layer)
        _freeze(self.work, frozen)
        end = _measure(self.work, layer, targets, r.tokens, r.mask, self.eval_sets, "after")
        after = self.label(layer)
        k = targets.neurons.tolist()
        free = [i for i in r.labeled if i not in set(k)]
        if phase is not None:
            after.save(phase / "labels_after.json")
        return LayerRecord(
            layer=layer, labeled=r.labeled, constrained=k, free=free,
            scores={"before": _summary(labels, k, layer), "after": _summary(after, k, layer)},
            free_scores={"before": _summary(labels, free, layer), "after": _summary(after, free, layer)},
            fidelity={**start["fidelity"], **end["fidelity"]}, match_loss={**start["match"], **end["match"]},
            loss={**start["loss"], **end["loss"]}, accuracy={**start["accuracy"], **end["accuracy"]},
            frozen=frozen, history=res.history, errors=targets.errors, labels_before=labels, labels_after=after)

    def final_training(self) -> list[dict[str, Any]]:
        """``final_steps`` of the original objective after the last layer (its history)."""
        from tl_modular.toy.recipe import train

        if not self.cfg.final_steps:
            return []
        res = train(self.work, self.tasks, eval_sets=self.eval_sets,
                    checkpoint_dir=self.root / "final" if self.root is not None else None, progress=self.progress,
                    checkpoint_every=self.cfg.checkpoint_every, steps=self.cfg.final_steps, **self.train_opts)
        return res.history


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


# --- checkpoints ---------------------------------------------------------------------------------

def _phase_step(phase: Path | None) -> int:
    """The step a phase's training checkpoint holds (0 when there is none)."""
    path = phase / "train_state.safetensors" if phase is not None else None
    if path is None or not path.exists():
        return 0
    meta = read_safetensors_header(path, writer="build_interpretable (start it again)")
    with reading(path, "build_interpretable (start it again)"):
        return int(meta.get("step", 0))


def _comparable(cfg_json: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_json.items() if k not in _FREE_ON_RESUME}


def _checkpoint(root: Path, model: Any, cfg: BuildConfig, initial: dict[str, Any], done: list[LayerRecord]) -> None:
    """The model first, the state last binding it: a run killed between them is refused on resume."""
    write_safetensors(root / _MODEL, model.state_dict(), {"kind": "build_interpretable_model", "bound_to": _STATE})
    _save_state(root, cfg, initial, done)


def _save_state(root: Path, cfg: BuildConfig, initial: dict[str, Any], done: list[LayerRecord]) -> None:
    files = bind_files(root, [_MODEL]) if (root / _MODEL).exists() else {}
    write_json(root / _STATE, {"schema": _SCHEMA, "version": SCHEMA_VERSION, "config": cfg.to_json(),
                               "initial": initial, "done": [r.to_json() for r in done], "files": files})


def _resume(root: Path | None, cfg: BuildConfig, model: Any) -> dict[str, Any]:
    """The finished layers of an earlier run in ``root`` (their model state loaded into ``model``)."""
    if root is None or not (root / _STATE).exists():
        return {"done": []}
    meta = read_versioned_json(root, _STATE, _SCHEMA, "build_interpretable (use another checkpoint_dir)",
                               required=("config", "done"))
    mine = _comparable(_json_roundtrip(cfg.to_json()))
    saved = _comparable(meta.get("config", {}))
    if saved != mine:
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise ValueError(f"{root} holds a build_interpretable run with other settings (differing: {diff}); resume "
                         "with the same settings (only eval_every and checkpoint_every may change) or use another "
                         "checkpoint_dir")
    state, _ = read_safetensors(root / _MODEL, device=next(model.parameters()).device,
                                writer="build_interpretable (use another checkpoint_dir)")
    with reading(root / _MODEL, "build_interpretable (use another checkpoint_dir)"):
        model.load_state_dict(state, strict=True)
    check_bound(root, _STATE, meta, [_MODEL], "build_interpretable (use another checkpoint_dir)")
    with reading(root / _STATE, "build_interpretable (use another checkpoint_dir)"):
        return {"done": [LayerRecord.from_json(d) for d in meta["done"]], "initial": meta.get("initial")}


def _json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparing with a saved config."""
    import json

    return json.loads(json.dumps(obj))
