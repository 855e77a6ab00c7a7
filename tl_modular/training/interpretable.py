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
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from tl_modular import labeling
from tl_modular._io import read_json, write_json
from tl_modular._names import hook_layer, layer_name
from tl_modular._tokens import check_tokens
from tl_modular.labeling import Labeler, Labels, Simulator
from tl_modular.tasks.task import Task
from tl_modular.training.build_config import BuildConfig
from tl_modular.training.build_result import BuildResult, LayerRecord
from tl_modular.training.build_state import _checkpoint, _phase_step, _resume
from tl_modular.training.matching import _Match, _measure, _original, _summary
from tl_modular.training.targets import _LabelRows, _make_targets, _Targets

__all__ = ["BuildConfig", "BuildResult", "LayerRecord", "build_interpretable", "lm_task"]


def lm_task(tokens: Int[torch.Tensor, "batch pos"], name: str = "lm") -> Task:
    """Next-token prediction at every position of ``tokens`` as a :class:`~tl_modular.task.Task`
    (metric ``logprob``), so that plain token data trains through the workbench's loop."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be a [batch, pos >= 2] integer tensor, got {getattr(tokens, 'shape', tokens)}")
    pos = torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1)
    return Task(name=name, clean=tokens, corrupted=tokens, positions=pos.clone(), answers=tokens[:, 1:].clone(),
                metric_kind="logprob")


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


# --- freezing -----------------------------------------------------------------------------------

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
