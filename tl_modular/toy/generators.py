"""The workbench's four tasks, each with a known algorithm, as deterministic :class:`Task` sets.

=================  ===========================================  ==========================
task               sequence (length)                            algorithm
=================  ===========================================  ==========================
induction          ``IND r.. x1..xk x1..xk`` (24)               previous-token + induction
modular_addition   ``ADD a + b = c`` (6), p = 31                a + b mod 31
brackets           ``BRK ( ( ) ... = d`` (15)                   depth = #open - #close
sorting            ``SRT x1..x5 > y1..y5`` (12)                 y = sorted(x)
=================  ===========================================  ==========================

Every generator takes ``n`` and ``seed`` and returns clean tokens, corrupted tokens of the
same shape (the corruption removes the task's signal), scored positions, answers, the
corrupted prompts' answers as ``wrong_answers``, and the logit-difference metric.

>>> task = induction(128, seed=0)
>>> task.clean.shape, task.positions.shape
(torch.Size([128, 24]), torch.Size([128, 7]))
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import torch

from tl_modular.tasks.task import Task
from tl_modular.toy.vocab import N_NUMBERS, TASK_TOKENS, token_id

__all__ = [
    "GENERATORS",
    "HELD_OUT_FRACTION",
    "MODULUS",
    "addition_pairs",
    "brackets",
    "induction",
    "mixed_tokens",
    "modular_addition",
    "sorting",
]

MODULUS = N_NUMBERS
#: Fraction of the ``MODULUS**2`` addition pairs never shown in training.
HELD_OUT_FRACTION = 0.3
_SPLIT_SEED = 20261122  # fixes which pairs are held out, independent of any data seed

_IND_LEN, _IND_SCORED, _IND_K = 24, 7, (8, 11)
_BRK_N = 12
_SORT_N = 5


def _tok(name: str) -> int:
    return token_id(TASK_TOKENS[name])


def _task(name: str, clean, corrupted, positions, answers, wrong) -> Task:
    as_long = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
    return Task(name=name, clean=as_long(clean), corrupted=as_long(corrupted),
                positions=as_long(positions), answers=as_long(answers), wrong_answers=as_long(wrong))


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive number of examples, got {n!r}")


def induction(n: int, *, seed: int = 0, repeat: tuple[int, int] = _IND_K) -> Task:
    """Copying a random sequence: ``IND r1..rj x1..xk x1..xk`` with k in 8..11, j = 23 - 2k.

    All tokens before the repeat are distinct, so each repeated token has one earlier
    occurrence and the next token is determined by it (the induction algorithm). The varying
    offset k rules out a positional shortcut. Scored: the last seven predictions inside the
    repeat. Corrupted: the first copy replaced by fresh distinct tokens; the wrong answer is
    the token the corrupted first copy holds where the clean answer stood.

    ``repeat=(lo, hi)`` draws k from another range, 2 <= lo <= hi <= 11 (the bundled model was
    trained on 8..11 and fails on repeats of 5 tokens or fewer: a shifted version of the task to
    fine-tune on); below 8, the last ``lo - 1`` predictions are scored (all lie in the repeat).
    """
    _check_n(n)
    lo, hi = repeat
    if not (isinstance(lo, int) and isinstance(hi, int) and 2 <= lo <= hi <= (_IND_LEN - 2) // 2):
        raise ValueError(f"repeat must be (lo, hi) with 2 <= lo <= hi <= {(_IND_LEN - 2) // 2}, got {repeat!r}")
    rng = random.Random(seed)
    clean, corrupted, positions, answers, wrong = [], [], [], [], []
    first_scored = _IND_LEN - 1 - min(_IND_SCORED, lo - 1)
    for _ in range(n):
        k = rng.randint(lo, hi)
        j = _IND_LEN - 1 - 2 * k
        pool = rng.sample(range(N_NUMBERS), j + 2 * k)
        filler, x, fresh = pool[:j], pool[j:j + k], pool[j + k:]
        seq = [_tok("induction"), *filler, *x, *x]
        bad = [_tok("induction"), *filler, *fresh, *x]
        pos = list(range(first_scored, _IND_LEN - 1))
        clean.append(seq)
        corrupted.append(bad)
        positions.append(pos)
        answers.append([seq[p + 1] for p in pos])
        wrong.append([bad[p + 1 - k] for p in pos])
    return _task("induction", clean, corrupted, positions, answers, wrong)


def addition_pairs(split: str = "train") -> list[tuple[int, int]]:
    """The ``(a, b)`` pairs of a split: ``"train"`` (70%), ``"test"`` (held out) or ``"all"``."""
    pairs = [(a, b) for a in range(MODULUS) for b in range(MODULUS)]
    random.Random(_SPLIT_SEED).shuffle(pairs)
    n_test = round(HELD_OUT_FRACTION * len(pairs))
    chosen = {"train": pairs[n_test:], "test": pairs[:n_test], "all": pairs}
    if split not in chosen:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return sorted(chosen[split])


def modular_addition(n: int | None = None, *, seed: int = 0, split: str = "train") -> Task:
    """``ADD a + b = c`` with ``c = (a + b) mod 31``; scored at ``=``.

    Args:
        n: Number of examples drawn (with replacement) from the split's pairs; ``None`` gives
            every pair of the split once, in order.
        split: ``"train"`` (the 70% of pairs the bundled model was trained on), ``"test"``
            (the held-out 30%) or ``"all"``.

    Corrupted: ``a`` replaced by another operand, so the sum changes; the wrong answer is
    the corrupted sum.
    """
    pairs = addition_pairs(split)
    rng = random.Random(seed)
    if n is None:
        chosen = pairs
    else:
        _check_n(n)
        chosen = [pairs[rng.randrange(len(pairs))] for _ in range(n)]
    plus, eq = token_id("+"), token_id("=")
    clean, corrupted, answers, wrong = [], [], [], []
    for a, b in chosen:
        a2 = (a + rng.randrange(1, MODULUS)) % MODULUS
        c, c2 = (a + b) % MODULUS, (a2 + b) % MODULUS
        clean.append([_tok("modular_addition"), a, plus, b, eq, c])
        corrupted.append([_tok("modular_addition"), a2, plus, b, eq, c2])
        answers.append([c])
        wrong.append([c2])
    return _task("modular_addition", clean, corrupted, [[4]] * len(chosen), answers, wrong)


def _paths_to(n: int, end: int) -> list[list[int]]:
    """ways[i][h]: bracket strings of the remaining n - i steps from depth h ending at ``end``
    without going below zero (a ballot-number table)."""
    ways = [[0] * (n + 2) for _ in range(n + 1)]
    ways[n][end] = 1
    for i in range(n - 1, -1, -1):
        for h in range(n + 1):
            ways[i][h] = ways[i + 1][h + 1] + (ways[i + 1][h - 1] if h > 0 else 0)
    return ways


_BRACKET_WAYS = {d: _paths_to(_BRK_N, d) for d in range(0, _BRK_N + 1, 2)}


def brackets(n: int, *, seed: int = 0) -> Task:
    """Bracket depth: ``BRK b1..b12 = d``, d the number of unclosed ``(`` of a valid prefix.

    The final depth is drawn uniformly from 0, 2, ..., 12 and the string uniformly among the
    valid strings reaching it (no prefix closes more than it opened). Scored at ``=``.
    Corrupted: one ``)`` flipped to ``(`` (depth + 2; or the last ``(`` closed when all are
    open), a one-token change that moves the answer.
    """
    _check_n(n)
    rng = random.Random(seed)
    open_, close, eq = token_id("("), token_id(")"), token_id("=")
    clean, corrupted, answers, wrong = [], [], [], []
    for _ in range(n):
        depth_end = rng.choice(sorted(_BRACKET_WAYS))
        ways, h, steps = _BRACKET_WAYS[depth_end], 0, []
        for i in range(_BRK_N):
            up, down = ways[i + 1][h + 1], (ways[i + 1][h - 1] if h > 0 else 0)
            step = 1 if rng.random() < up / (up + down) else -1
            steps.append(step)
            h += step
        bad = list(steps)
        closes = [i for i, s in enumerate(steps) if s < 0]
        if closes:
            bad[rng.choice(closes)] = 1
        else:
            bad[-1] = -1
        as_tokens = lambda s: [open_ if x > 0 else close for x in s]  # noqa: E731
        d, d2 = sum(steps), sum(bad)
        clean.append([_tok("brackets"), *as_tokens(steps), eq, d])
        corrupted.append([_tok("brackets"), *as_tokens(bad), eq, d2])
        answers.append([d])
        wrong.append([d2])
    return _task("brackets", clean, corrupted, [[_BRK_N + 1]] * n, answers, wrong)


def sorting(n: int, *, seed: int = 0) -> Task:
    """``SRT x1..x5 > y1..y5``: five distinct numbers, then the same numbers in ascending order.

    Scored: the five predictions from ``>`` on. Corrupted: a fresh list (and its sorted copy);
    the wrong answers are the corrupted list's sorted elements.
    """
    _check_n(n)
    rng = random.Random(seed)
    gt = token_id(">")
    clean, corrupted, answers, wrong = [], [], [], []
    start = 1 + _SORT_N  # position of ">"
    for _ in range(n):
        x = rng.sample(range(N_NUMBERS), _SORT_N)
        x2 = rng.sample(range(N_NUMBERS), _SORT_N)
        while sorted(x2) == sorted(x):  # pragma: no cover - probability ~6e-6
            x2 = rng.sample(range(N_NUMBERS), _SORT_N)
        clean.append([_tok("sorting"), *x, gt, *sorted(x)])
        corrupted.append([_tok("sorting"), *x2, gt, *sorted(x2)])
        answers.append(sorted(x))
        wrong.append(sorted(x2))
    return _task("sorting", clean, corrupted, [list(range(start, start + _SORT_N))] * n,
                 answers, wrong)


#: Task name -> generator ``(n, seed=...) -> Task``.
GENERATORS: dict[str, Callable[..., Task]] = {
    "induction": induction,
    "modular_addition": modular_addition,
    "brackets": brackets,
    "sorting": sorting,
}


def mixed_tokens(tasks: Mapping[str, Task] | Sequence[Task] | None = None, *, n_per_task: int = 256,
                 seed: int = 0, scored: bool = False) -> tuple[torch.Tensor, ...]:
    """Clean prompts of several tasks in one ``[batch, pos]`` tensor, for statistics over the mix.

    Shorter sequences are right-padded with ``PAD``; the returned attention mask is 1 on real
    tokens (causal attention means padding never affects them). Rows are shuffled
    deterministically. Default: ``n_per_task`` fresh prompts of every task. With ``scored=True``
    a third ``[batch, pos]`` tensor marks the positions whose next-token prediction the task
    scores (the model was trained on those only): pass it as ``loss_mask=`` to loss-based tools.
    """
    if tasks is None:
        tasks = [gen(n_per_task, seed=seed + i) for i, gen in enumerate(GENERATORS.values())]
    tasks = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    if not tasks:
        raise ValueError("mixed_tokens needs at least one task")
    rows = [t.clean[:n_per_task] for t in tasks]
    length = max(r.shape[1] for r in rows)
    tokens = torch.cat([torch.nn.functional.pad(r, (0, length - r.shape[1]), value=token_id("PAD"))
                        for r in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(r), (0, length - r.shape[1])) for r in rows])
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))
    if not scored:
        return tokens[order], mask[order]
    marks = []
    for t, r in zip(tasks, rows, strict=True):
        m = torch.zeros(r.shape[0], length, dtype=torch.long)
        marks.append(m.scatter_(1, t.positions[:n_per_task], 1))
    return tokens[order], mask[order], torch.cat(marks)[order]
