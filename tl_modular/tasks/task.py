"""The :class:`Task` dataclass: clean and corrupted inputs with a metric, for circuit work.

One dataclass serves the bundled toy workbench (:mod:`tl_modular.toy`) and the GPT-2 prompt
sets (:mod:`tl_modular.tasks`): ``(clean, corrupted, positions, answers, wrong_answers, metric)``.

>>> task = tlm.toy.induction(64, seed=0)          # doctest: +SKIP
>>> task.metric(model(task.clean))                 # mean logit difference  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from jaxtyping import Float, Int

__all__ = ["MetricKind", "Task"]

MetricKind = Literal["logit_diff", "accuracy", "logprob", "prob_diff_greater"]


@dataclass(frozen=True, kw_only=True)
class Task:
    """A batch of clean and corrupted prompts with scored positions and a metric.

    Attributes:
        name: Task name (``"induction"``, ``"ioi"``, ...).
        clean: ``[batch, pos]`` token ids.
        corrupted: ``[batch, pos]`` token ids of the same shape, with the task's signal removed.
        positions: ``[batch, n_scored]`` positions whose next-token logits are scored.
        answers: ``[batch, n_scored]`` correct next tokens at those positions.
        wrong_answers: ``[batch, n_scored]`` the answers of the corrupted prompts (the
            contrast for the logit difference), or ``None``.
        metric_kind: What :meth:`metric` computes: ``"logit_diff"`` (answer minus wrong
            answer), ``"accuracy"`` (argmax equals answer), ``"logprob"`` (of the answer), or
            ``"prob_diff_greater"`` (greater-than: probability of answer-set entries above the
            threshold in ``answers`` minus those at or below it).
        answer_set: Token ids of the ordered answer space for ``"prob_diff_greater"``
            (e.g. the 100 two-digit year endings), else ``None``.
    """

    name: str
    clean: Int[torch.Tensor, "batch pos"]
    corrupted: Int[torch.Tensor, "batch pos"]
    positions: Int[torch.Tensor, "batch n_scored"]
    answers: Int[torch.Tensor, "batch n_scored"]
    wrong_answers: Int[torch.Tensor, "batch n_scored"] | None = None
    metric_kind: MetricKind = "logit_diff"
    answer_set: Int[torch.Tensor, " n_answers"] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.clean.ndim != 2 or self.clean.shape[0] == 0:
            raise ValueError(f"{self.name}: clean tokens must be a non-empty [batch, pos] tensor, "
                             f"got shape {tuple(self.clean.shape)}")
        if self.corrupted.shape != self.clean.shape:
            raise ValueError(f"{self.name}: corrupted tokens {tuple(self.corrupted.shape)} must have "
                             f"the clean tokens' shape {tuple(self.clean.shape)}")
        batch = self.clean.shape[0]
        for label, t in (("positions", self.positions), ("answers", self.answers),
                         ("wrong_answers", self.wrong_answers)):
            if t is not None and (t.ndim != 2 or t.shape != self.positions.shape or t.shape[0] != batch):
                raise ValueError(f"{self.name}: {label} must be [batch={batch}, n_scored] like "
                                 f"positions {tuple(self.positions.shape)}, got {tuple(t.shape)}")
        if self.positions.numel() and (self.positions.min() < 0
                                       or self.positions.max() >= self.clean.shape[1]):
            raise ValueError(f"{self.name}: scored positions must lie in [0, {self.clean.shape[1]})")
        if self.metric_kind == "logit_diff" and self.wrong_answers is None:
            raise ValueError(f"{self.name}: metric 'logit_diff' needs wrong_answers; "
                             "use metric_kind='logprob' or 'accuracy' instead")
        if self.metric_kind == "prob_diff_greater" and self.answer_set is None:
            raise ValueError(f"{self.name}: metric 'prob_diff_greater' needs answer_set")

    def __len__(self) -> int:
        return self.clean.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor) -> Task:
        """The sub-batch ``index`` (an int keeps a batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return replace(self, clean=self.clean[index], corrupted=self.corrupted[index],
                       positions=self.positions[index], answers=self.answers[index],
                       wrong_answers=pick(self.wrong_answers))

    def to(self, device: torch.device | str) -> Task:
        """The same task with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, clean=move(self.clean), corrupted=move(self.corrupted),
                       positions=move(self.positions), answers=move(self.answers),
                       wrong_answers=move(self.wrong_answers), answer_set=move(self.answer_set))

    def scored_logits(self, logits: Float[torch.Tensor, "batch pos d_vocab"]
                      ) -> Float[torch.Tensor, "batch n_scored d_vocab"]:
        """The logits at the scored positions."""
        if logits.shape[:2] != self.clean.shape:
            raise ValueError(f"{self.name}: logits {tuple(logits.shape)} do not match the task's "
                             f"[batch, pos] = {tuple(self.clean.shape)}")
        index = self.positions.to(logits.device)
        return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))

    def metric(self, logits: Float[torch.Tensor, "batch pos d_vocab"], *,
               per_example: bool = False, kind: MetricKind | None = None) -> torch.Tensor:
        """The task's metric on a model's logits: a scalar mean, or ``[batch]`` per example.

        Args:
            logits: Logits of the model on ``clean`` (or a patched run on it).
            per_example: Return one value per example, averaged over its scored positions.
            kind: Override :attr:`metric_kind` (e.g. ``"accuracy"`` on a logit-diff task).
        """
        kind = kind or self.metric_kind
        scored = self.scored_logits(logits).float()
        answers = self.answers.to(logits.device)
        if kind == "logit_diff":
            if self.wrong_answers is None:
                raise ValueError(f"{self.name}: no wrong_answers for a logit difference")
            wrong = self.wrong_answers.to(logits.device)
            values = (scored.gather(-1, answers[..., None]) - scored.gather(-1, wrong[..., None]))[..., 0]
        elif kind == "accuracy":
            values = (scored.argmax(-1) == answers).float()
        elif kind == "logprob":
            values = scored.log_softmax(-1).gather(-1, answers[..., None])[..., 0]
        elif kind == "prob_diff_greater":
            values = _greater_than_prob_diff(scored, answers, self.answer_set.to(logits.device))
        else:
            raise ValueError(f"unknown metric kind {kind!r}; choose one of {MetricKind.__args__}")
        values = values.mean(-1)
        return values if per_example else values.mean()

    def accuracy(self, logits: Float[torch.Tensor, "batch pos d_vocab"]) -> float:
        """Fraction of scored positions where the top logit is the answer."""
        return float(self.metric(logits, kind="accuracy"))


def _greater_than_prob_diff(scored: torch.Tensor, answers: torch.Tensor,
                            answer_set: torch.Tensor) -> torch.Tensor:
    # Hanna et al. (2023): P(year > YY) - P(year <= YY) over the two-digit endings.
    probs = scored.softmax(-1)[..., answer_set]                       # [batch, n, n_answers]
    threshold = (answers[..., None] == answer_set).float().argmax(-1)  # index of YY in the set
    above = torch.arange(len(answer_set), device=scored.device) > threshold[..., None]
    return (probs * above).sum(-1) - (probs * ~above).sum(-1)
