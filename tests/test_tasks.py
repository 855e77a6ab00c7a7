"""GPT-2 prompt sets (real GPT-2 tokenizer) and the Task dataclass."""

from __future__ import annotations

import pytest
import torch

from tl_modular import tasks
from tl_modular.tasks.task import Task

GENERATORS = [tasks.ioi, tasks.greater_than, tasks.docstring, tasks.induction]


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__)
def test_prompt_sets_are_valid_and_deterministic(make, gpt2_tokenizer):
    task = make(gpt2_tokenizer, 40, seed=3)
    assert task.clean.shape == task.corrupted.shape and task.clean.shape[0] == 40
    assert (task.clean[:, 0] == 50256).all()           # BOS
    assert (task.positions < task.clean.shape[1]).all()
    # every answer is one token of the vocabulary
    assert task.answers.dtype == torch.long and (task.answers < len(gpt2_tokenizer)).all()
    again = make(gpt2_tokenizer, 40, seed=3)
    assert torch.equal(task.clean, again.clean) and torch.equal(task.corrupted, again.corrupted)
    other = make(gpt2_tokenizer, 40, seed=4)
    assert not torch.equal(task.clean, other.clean)
    if make is tasks.induction:
        return  # random token ids, not text
    # each prompt really is its text re-tokenized (no merges across slot boundaries)
    for row in task.clean[:5]:
        text = gpt2_tokenizer.decode(row[1:], clean_up_tokenization_spaces=False)
        assert gpt2_tokenizer.encode(text, add_special_tokens=False) == row[1:].tolist()


def test_ioi_answers_are_the_names(gpt2_tokenizer):
    task = tasks.ioi(gpt2_tokenizer, 20, seed=0)
    for row, io, s, bad in zip(task.clean, task.answers[:, 0], task.wrong_answers[:, 0],
                               task.corrupted, strict=True):
        assert (row == io).sum() == 1 and (row == s).sum() == 2       # IO once, S twice
        assert (bad == io).sum() == 0 and (bad == s).sum() == 0        # ABC: fresh names
    orders = [gpt2_tokenizer.decode(r) for r in task.clean[:2]]
    assert all(" and " in o for o in orders)
    with pytest.raises(ValueError, match="order"):
        tasks.ioi(gpt2_tokenizer, 2, order="AB")


def test_greater_than_years_and_metric(gpt2_tokenizer):
    task = tasks.greater_than(gpt2_tokenizer, 30, seed=1)
    assert task.metric_kind == "prob_diff_greater" and len(task.answer_set) == 100
    text = gpt2_tokenizer.decode(task.clean[0, 1:])
    assert text.startswith("The ") and " lasted from the year " in text
    assert gpt2_tokenizer.decode(task.corrupted[0, 1:]).split("year ")[1][2:4] == "01"
    # A model putting all mass on "99" scores +1, all on "00" scores -1.
    logits = torch.full((30, task.clean.shape[1], len(gpt2_tokenizer)), -1e4)
    logits[..., task.answer_set[99]] = 0
    assert task.metric(logits).item() == pytest.approx(1.0)
    logits[..., task.answer_set[99]] = -1e4
    logits[..., task.answer_set[0]] = 0
    assert task.metric(logits).item() == pytest.approx(-1.0)


def test_docstring_answer_is_in_the_signature_only_when_clean(gpt2_tokenizer):
    task = tasks.docstring(gpt2_tokenizer, 10, seed=2)
    for row, bad, ans in zip(task.clean, task.corrupted, task.answers[:, 0], strict=True):
        assert (row == ans).any() and not (bad == ans).any()


def test_task_metrics_and_validation():
    clean = torch.tensor([[1, 2, 3], [1, 3, 2]])
    task = Task(name="t", clean=clean, corrupted=clean.flip(-1), positions=torch.tensor([[1], [2]]),
                answers=torch.tensor([[3], [0]]), wrong_answers=torch.tensor([[2], [1]]))
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 3] = 2.0
    logits[1, 2, 1] = 1.0
    assert task.metric(logits, per_example=True).tolist() == [2.0, -1.0]
    assert task.metric(logits).item() == 0.5
    assert task.accuracy(logits) == 0.5
    assert len(task[1:]) == 1 and task[0].answers.tolist() == [[3]]
    with pytest.raises(ValueError, match="same shape|shape"):
        Task(name="t", clean=clean, corrupted=clean[:1], positions=task.positions, answers=task.answers,
             wrong_answers=task.wrong_answers)
    with pytest.raises(ValueError, match="wrong_answers"):
        Task(name="t", clean=clean, corrupted=clean, positions=task.positions, answers=task.answers)
    with pytest.raises(ValueError, match="scored positions"):
        Task(name="t", clean=clean, corrupted=clean, positions=task.positions + 5, answers=task.answers,
             metric_kind="accuracy")
    with pytest.raises(ValueError, match="logits"):
        task.metric(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="non-empty"):
        Task(name="t", clean=clean[:0], corrupted=clean[:0], positions=task.positions[:0],
             answers=task.answers[:0], metric_kind="accuracy")
