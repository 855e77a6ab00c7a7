"""The training loop: next-token prediction at the tasks' scored positions, with resumable checkpoints.

One loop for everything that trains: the workbench trains and continues its model with it
(:func:`tl_modular.toy.train` adds the workbench's architecture and task mix as defaults), model
diffing fine-tunes with it, and modularity training adds its penalty through ``extra_loss``.

>>> result = train(model, tasks, steps=300, checkpoint_dir="runs/ft")   # doctest: +SKIP
>>> result.model, result.history[-1]["accuracy"]                         # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tl_modular._io import read_safetensors, reading, write_safetensors
from tl_modular.tasks.task import Task

__all__ = ["TrainConfig", "TrainResult", "evaluate", "task_loss", "train"]

_CHECKPOINT = "train_state.safetensors"


@dataclass(kw_only=True)
class TrainConfig:
    """Hyper-parameters of :func:`train` (validated; saved with every checkpoint)."""

    steps: int = 6000
    batch_size: int = 64          # examples per task per step
    lr: float = 1e-3
    weight_decay: float = 1.0     # weight decay is what makes modular addition generalise
    # Parameters (by name substring) trained without weight decay: norm scales and biases (as
    # usual), and the query/key weights — decaying those keeps attention patterns diffuse.
    no_decay: tuple[str, ...] = ("W_Q", "W_K", "ln", "b_")
    warmup: int = 200
    min_lr_ratio: float = 0.1     # cosine decay to lr * min_lr_ratio
    betas: tuple[float, float] = (0.9, 0.98)
    # AdamW's epsilon. The default is torch's; a larger one (e.g. 1e-6) when continuing a model
    # whose loss is already ~0 keeps parameters with negligible gradient where they are (Adam
    # otherwise normalises even vanishing gradients to steps of ~lr, moving every weight).
    eps: float = 1e-8
    grad_clip: float = 1.0
    pool_size: int = 20_000       # training examples generated per task (default data only)
    eval_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "pool_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if (self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1
                or not self.eps > 0):
            raise ValueError("TrainConfig needs lr > 0, weight_decay >= 0, warmup >= 0, "
                             f"0 <= min_lr_ratio <= 1 and eps > 0; got {self}")
        self.betas = tuple(self.betas)
        self.no_decay = tuple(self.no_decay)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model and one record per evaluation."""

    model: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0


@torch.no_grad()
def evaluate(model: Any, tasks: Mapping[str, Task], batch_size: int = 512) -> dict[str, float]:
    """Accuracy (argmax at every scored position) per task."""
    device = next(model.parameters()).device
    out = {}
    for name, task in tasks.items():
        hits = 0.0
        for start in range(0, len(task), batch_size):
            part = task[start:start + batch_size].to(device)
            hits += part.accuracy(model(part.clean)) * len(part)
        out[name] = hits / len(task)
    return out


def task_loss(model: Any, task: Task) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on ``task``'s answers at its scored positions."""
    logits = task.scored_logits(model(task.clean))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), task.answers.flatten())


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: Any,
    data: Task | Sequence[Task] | Mapping[str, Task],
    *,
    extra_loss: Callable[[Any], torch.Tensor] | None = None,
    callback: Callable[[int, Any, dict[str, Any]], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    eval_sets: Mapping[str, Task] | None = None,
    progress: bool = True,
    **config: Any,
) -> TrainResult:
    """Train a ``HookedTransformer`` on next-token prediction at the tasks' scored positions.

    Args:
        model: The ``HookedTransformer`` to train (it is trained in place and returned).
        data: Tasks to train on (their ``clean`` tokens, ``answers`` at ``positions``); each
            step draws ``batch_size`` examples from every task.
        extra_loss: ``extra_loss(model) -> scalar`` added to the loss every step (e.g. a
            modularity penalty).
        callback: ``callback(step, model, record)`` after every evaluation; return ``True``
            to stop early.
        checkpoint_dir: Save a resumable checkpoint here every ``checkpoint_every`` steps and
            at the end; if it already holds one, training resumes from it.
        eval_sets: Tasks evaluated every ``eval_every`` steps; default: the first 512 examples
            of each task in ``data``.
        progress: Show a progress bar.
        **config: Fields of :class:`TrainConfig` (``steps``, ``lr``, ``seed``, ...).

    Returns:
        :class:`TrainResult` with the model (in eval mode) and the evaluation history.
    """
    cfg = TrainConfig(**config)
    tasks = _as_tasks(data)
    if eval_sets is None:
        eval_sets = {t.name: t[:512] for t in tasks}
    device = next(model.parameters()).device
    tasks = [t.to(device) for t in tasks]
    optimizer = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult(model=model)
    path = Path(checkpoint_dir) / _CHECKPOINT if checkpoint_dir is not None else None
    if path is not None and path.exists():
        result.step, result.history = _load_checkpoint(path, model, optimizer, gen, cfg)
    # Built after a resume so that it starts from the resumed step's learning rate.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg),
                                                  last_epoch=result.step - 1)

    model.train()
    bar = tqdm(total=cfg.steps, initial=result.step, disable=not progress, desc="train", leave=False)
    stop = False
    try:
        while result.step < cfg.steps and not stop:
            loss, losses, extra = _step(model, tasks, cfg, gen, optimizer, extra_loss)
            scheduler.step()
            result.step += 1
            bar.update(1)
            if result.step % cfg.eval_every == 0 or result.step == cfg.steps:
                record = _evaluation(model, result.step, loss, losses, extra, eval_sets, scheduler.get_last_lr()[0])
                result.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", min_acc=f"{min(record['accuracy'].values()):.3f}")
                stop = bool(callback(result.step, model, record)) if callback is not None else False
                model.train()
            if path is not None and (result.step % checkpoint_every == 0 or result.step == cfg.steps or stop):
                _save_checkpoint(path, model, optimizer, gen, cfg, result)
    finally:
        bar.close()
        model.eval()
    return result


def _optimizer(model: Any, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter but those named in ``cfg.no_decay``."""
    named = list(model.named_parameters())
    plain = [p for n, p in named if any(k in n for k in cfg.no_decay)]
    decayed = [p for n, p in named if not any(k in n for k in cfg.no_decay)]
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _step(model: Any, tasks: list[Task], cfg: TrainConfig, gen: torch.Generator, optimizer: torch.optim.Optimizer,
          extra_loss: Callable[[Any], torch.Tensor] | None
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """One optimizer step on ``batch_size`` examples of every task (plus ``extra_loss``, clipped):
    the mean task loss, each task's loss and the extra term."""
    optimizer.zero_grad(set_to_none=True)
    losses = {t.name: task_loss(model, t[torch.randint(len(t), (cfg.batch_size,), generator=gen)]) for t in tasks}
    loss = torch.stack(list(losses.values())).mean()
    extra = extra_loss(model) if extra_loss is not None else None
    total = loss if extra is None else loss + extra
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss, losses, extra


def _evaluation(model: Any, step: int, loss: torch.Tensor, losses: dict[str, torch.Tensor], extra: torch.Tensor | None,
                eval_sets: Mapping[str, Task], lr: float) -> dict[str, Any]:
    """The history record of ``step``: the step's losses and the accuracy on ``eval_sets`` (the model
    is left in eval mode)."""
    model.eval()
    record = {"step": step, "loss": float(loss.detach()),
              "task_loss": {k: float(v.detach()) for k, v in losses.items()},
              "accuracy": evaluate(model, eval_sets), "lr": lr}
    if extra is not None:
        record["extra_loss"] = float(extra.detach())
    return record


def _as_tasks(data: Any) -> list[Task]:
    if isinstance(data, Task):
        return [data]
    tasks = list(data.values()) if isinstance(data, Mapping) else list(data)
    if not tasks or not all(isinstance(t, Task) for t in tasks):
        raise TypeError("data must be a Task, a non-empty sequence or mapping of Tasks, or None for "
                        f"the default task mix (tl_modular.toy.train); got {type(data).__name__}")
    return tasks


def _save_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                     cfg: TrainConfig, result: TrainResult) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng"] = gen.get_state()
    meta = {"kind": "toy_train_state", "step": result.step, "config": asdict(cfg),
            "param_groups": opt["param_groups"], "history": result.history}
    write_safetensors(path, tensors, meta)


def _load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                     cfg: TrainConfig) -> tuple[int, list[dict[str, Any]]]:
    tensors, meta = read_safetensors(path, writer="tlm.toy.train(checkpoint_dir=...)")
    free = ("steps", "eval_every")  # may change on resume: they do not alter the trajectory
    # fields added to TrainConfig later (eps) hold their defaults in older checkpoints
    later = {"eps": TrainConfig.eps}
    saved = {k: v for k, v in {**later, **meta.get("config", {})}.items() if k not in free}
    mine = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k not in free}
    saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in saved.items()}
    if meta.get("kind") != "toy_train_state" or saved != mine:
        raise ValueError(f"{path} holds a checkpoint of a different run (config {saved}); resume with "
                         "the same settings (only `steps` and `eval_every` may change) or use another checkpoint_dir")
    device = next(model.parameters()).device
    with reading(path, "tlm.toy.train(checkpoint_dir=...)"):     # missing or misshapen tensors name the file
        model.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value.to(device) if name != "step" else value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        gen.set_state(tensors["rng"])
        return int(meta["step"]), list(meta.get("history", []))
