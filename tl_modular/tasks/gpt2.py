"""Standard circuit-discovery prompt sets for GPT-2-tokenizer models, generated locally.

Each generator takes a tokenizer (a Hugging Face tokenizer, or a model whose ``.tokenizer``
is one), a number of prompts and a seed, and returns a :class:`~tl_modular.task.Task` whose
prompts all tokenize to the same length, with single-token answers:

- :func:`ioi` — indirect object identification (Wang et al., 2022), ABBA and BABA templates;
  corrupted prompts use three fresh names (the "ABC" distribution).
- :func:`greater_than` — "The war lasted from the year 1732 to the year 17" (Hanna et al., 2023);
  corrupted start year ``XX01``; metric P(YY' > YY) - P(YY' <= YY).
- :func:`docstring` — completing the next ``:param`` name of a Python docstring (Heimersheim &
  Janiak, 2023); corrupted prompts rename the function's arguments.
- :func:`induction` — repeated random tokens; corrupted prompts have a fresh first half.

>>> from transformers import AutoTokenizer
>>> tok = AutoTokenizer.from_pretrained("path/to/gpt2-tokenizer")   # doctest: +SKIP
>>> task = tlm.tasks.ioi(tok, 64, seed=0)                           # doctest: +SKIP
>>> task.metric(model(task.clean))                                  # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from tl_modular.tasks.task import Task

__all__ = ["IOI_TEMPLATES", "docstring", "greater_than", "induction", "ioi"]

_NAMES = """Michael Christopher Jessica Matthew Ashley Jennifer Joshua Amanda Daniel David James Robert
John Joseph Andrew Ryan Brandon Jason Justin Sarah William Jonathan Stephanie Brian Nicole Nicholas
Anthony Heather Eric Elizabeth Adam Megan Melissa Kevin Steven Thomas Timothy Christina Kyle Rachel
Laura Lauren Amber Brittany Danielle Richard Kimberly Jeffrey Amy Crystal Michelle Tiffany Jeremy
Benjamin Mark Emily Aaron Charles Rebecca Jacob Stephen Patrick Sean Erin Jamie Kelly Samantha Nathan
Sara Dustin Paul Angela Tyler Scott Katherine Andrea Gregory Erica Mary Travis Lisa Kenneth Bryan
Lindsey Kristen Jose Alexander Jesse Katie Lindsay Shannon Vanessa Courtney Christine Alicia Cody
Allison Bradley Samuel""".split()
_PLACES = "store garden restaurant school hospital office house station park church market".split()
_OBJECTS = "ring kiss bone basketball computer necklace drink snack book bottle letter".split()

#: IOI templates (Wang et al., 2022) in BABA form; ``{A}`` is the indirect object, ``{B}`` the
#: subject. ABBA prompts swap the first two names.
IOI_TEMPLATES = [
    "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a lot of fun at the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} were working at the {PLACE}. {B} decided to give a {OBJECT} to",
    "Then, {B} and {A} were thinking about going to the {PLACE}. {B} wanted to give a {OBJECT} to",
    "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give it to",
    "While {B} and {A} were working at the {PLACE}, {B} gave a {OBJECT} to",
    "While {B} and {A} were commuting to the {PLACE}, {B} gave a {OBJECT} to",
    "After the lunch, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Afterwards, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Friends {B} and {A} found a {OBJECT} at the {PLACE}. {B} gave it to",
    "When {B} and {A} arrived at the {PLACE}, {B} gave a {OBJECT} to",
]

_GT_NOUNS = """war dynasty siege reign strike trip journey pilgrimage expedition campaign occupation
crisis revolution empire conflict marriage tour voyage rebellion festival""".split()

_DOC_ARGS = """load size files last data user name value port path key item node line text file mode
type state table field index count start end color image order group source target result config
model event label page query token stream buffer limit offset width height scale level block frame
shape""".split()
_DOC_WORDS = """crime population unit dark oil column piece water fire light house money power world
music river story paper metal glass stone cloud snow wind horse road bank market chair""".split()
_DOC_FUNCS = "port get load run check update create parse build read write process".split()


def _tokenizer(tokenizer: Any) -> Any:
    tok = getattr(tokenizer, "tokenizer", None) if not hasattr(tokenizer, "encode") else tokenizer
    if tok is None or not hasattr(tok, "encode"):
        raise TypeError("expected a Hugging Face tokenizer or a model with a .tokenizer; got "
                        f"{type(tokenizer).__name__}")
    return tok


def _ids(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _single(tok: Any, words: Sequence[str], prefix: str = " ") -> list[str]:
    """The words that are one token when preceded by ``prefix``."""
    return [w for w in words if len(_ids(tok, prefix + w)) == 1]


def _bos(tok: Any, prepend_bos: bool) -> list[int]:
    if not prepend_bos:
        return []
    if tok.bos_token_id is None:
        raise ValueError("the tokenizer has no BOS token; pass prepend_bos=False")
    return [tok.bos_token_id]


def _check(n: int, need: int, what: str) -> None:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive number of prompts, got {n!r}")
    if need < 0:
        raise ValueError(f"this tokenizer leaves too few single-token {what} to build the set")


def _finish(name: str, clean, corrupted, answers, wrong, **kwargs) -> Task:
    lengths = {len(x) for x in clean} | {len(x) for x in corrupted}
    if len(lengths) != 1:  # pragma: no cover - guarded by construction
        raise RuntimeError(f"{name}: prompts tokenized to different lengths {sorted(lengths)}")
    length = lengths.pop()
    n = len(clean)
    as_long = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
    positions = kwargs.pop("positions", [[length - 1]] * n)
    return Task(name=name, clean=as_long(clean), corrupted=as_long(corrupted),
                positions=as_long(positions), answers=as_long(answers),
                wrong_answers=None if wrong is None else as_long(wrong), **kwargs)


def ioi(tokenizer: Any, n: int, *, seed: int = 0, order: str = "both",
        templates: Sequence[str] | None = None, prepend_bos: bool = True) -> Task:
    """Indirect object identification prompts; metric: logit(IO) - logit(S).

    Args:
        order: ``"ABBA"``, ``"BABA"`` or ``"both"`` (alternating).
        templates: Templates to draw from (default :data:`IOI_TEMPLATES`); only the largest
            group of equal token length is used, so that every prompt has the same length.
    """
    tok = _tokenizer(tokenizer)
    names = _single(tok, _NAMES)
    places, objects = _single(tok, _PLACES), _single(tok, _OBJECTS)
    _check(n, min(len(names) - 5, len(places) - 1, len(objects) - 1), "names, places or objects")
    if order not in ("ABBA", "BABA", "both"):
        raise ValueError(f"order must be 'ABBA', 'BABA' or 'both', got {order!r}")
    fill = {"A": names[0], "B": names[1], "PLACE": places[0], "OBJECT": objects[0]}
    pool = list(IOI_TEMPLATES if templates is None else templates)
    length = {t: len(_ids(tok, t.format(**fill))) for t in pool}
    common = Counter(length.values()).most_common(1)[0][0]
    pool = [t for t in pool if length[t] == common]
    rng = random.Random(seed)
    bos = _bos(tok, prepend_bos)
    clean, corrupted, answers, wrong = [], [], [], []
    for i in range(n):
        template = rng.choice(pool)
        a, b, c, d, e = rng.sample(names, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        abba = order == "ABBA" or (order == "both" and i % 2 == 0)
        form = template.replace("{B} and {A}", "{A} and {B}", 1) if abba else template
        clean.append(bos + _ids(tok, form.format(A=a, B=b, PLACE=place, OBJECT=obj)))
        # ABC corruption: three fresh names, so neither answer is favoured.
        corrupted.append(bos + _ids(tok, form.replace("{B}", "{E}", 1).replace("{B}", "{B2}")
                                    .format(A=c, E=d, B2=e, PLACE=place, OBJECT=obj)))
        answers.append([_ids(tok, " " + a)[0]])
        wrong.append([_ids(tok, " " + b)[0]])
    return _finish("ioi", clean, corrupted, answers, wrong)


def _two_digit_tokens(tok: Any) -> list[int] | None:
    ids = [_ids(tok, f"{y:02d}") for y in range(100)]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


def greater_than(tokenizer: Any, n: int, *, seed: int = 0, prepend_bos: bool = True) -> Task:
    """"The {noun} lasted from the year {XX}{YY} to the year {XX}"; metric: probability mass on
    endings above YY minus at or below it. Years are kept only where " XXYY" tokenizes as
    " XX" + "YY"; YY runs over 02..98. Corrupted: start year XX01."""
    tok = _tokenizer(tokenizer)
    endings = _two_digit_tokens(tok)
    if endings is None:
        raise ValueError("greater_than needs every two-digit string 00..99 to be one token")
    nouns = _single(tok, _GT_NOUNS)
    years = [(xx, yy) for xx in range(11, 18) for yy in range(2, 99)
             if _ids(tok, f" {xx}{yy:02d}") == _ids(tok, f" {xx}") + [endings[yy]]
             and _ids(tok, f" {xx}01") == _ids(tok, f" {xx}") + [endings[1]]]
    _check(n, min(len(nouns), len(years)) - 1, "nouns or years")
    rng = random.Random(seed)
    bos = _bos(tok, prepend_bos)
    clean, corrupted, answers = [], [], []
    for _ in range(n):
        noun, (xx, yy) = rng.choice(nouns), rng.choice(years)
        prompt = "The {noun} lasted from the year {xx}{yy:02d} to the year {xx}"
        clean.append(bos + _ids(tok, prompt.format(noun=noun, xx=xx, yy=yy)))
        corrupted.append(bos + _ids(tok, prompt.format(noun=noun, xx=xx, yy=1)))
        answers.append([endings[yy]])
    return _finish("greater_than", clean, corrupted, answers, None,
                   metric_kind="prob_diff_greater", answer_set=torch.tensor(endings))


def docstring(tokenizer: Any, n: int, *, seed: int = 0, prepend_bos: bool = True) -> Task:
    """Docstring argument completion: after two documented ``:param`` lines, predict the third
    argument's name. Corrupted: the function's arguments renamed (the answer is no longer in
    the signature); the wrong answer is the corrupted signature's third argument."""
    tok = _tokenizer(tokenizer)
    args, words, funcs = _single(tok, _DOC_ARGS), _single(tok, _DOC_WORDS), _single(tok, _DOC_FUNCS)
    # The docstring's first word follows the quotes without a space.
    quotes = _ids(tok, '    """')
    firsts = [w for w in words
              if len(_ids(tok, w)) == 1 and _ids(tok, '    """' + w) == quotes + _ids(tok, w)]
    _check(n, min(len(args) - 10, len(words) - 7, len(funcs) - 1, len(firsts) - 1),
           "argument names or words")
    rng = random.Random(seed)
    bos = _bos(tok, prepend_bos)
    text = ('def {f}(self, {a[0]}, {a[1]}, {a[2]}, {a[3]}, {a[4]}):\n    """{w[0]} {w[1]} {w[2]}\n\n'
            "    :param {d[0]}: {w[3]} {w[4]}\n    :param {d[1]}: {w[5]} {w[6]}\n    :param")
    clean, corrupted, answers, wrong = [], [], [], []
    for _ in range(n):
        names = rng.sample(args, 10)
        sig, other = names[:5], names[5:]
        w, f = rng.sample(words, 7), rng.choice(funcs)
        w[0] = rng.choice([x for x in firsts if x not in w[1:]])
        clean.append(bos + _ids(tok, text.format(f=f, a=sig, d=sig, w=w)))
        corrupted.append(bos + _ids(tok, text.format(f=f, a=other, d=sig, w=w)))
        answers.append([_ids(tok, " " + sig[2])[0]])
        wrong.append([_ids(tok, " " + other[2])[0]])
    if len({len(c) for c in clean + corrupted}) != 1:
        raise ValueError("docstring prompts tokenized to different lengths with this tokenizer")
    return _finish("docstring", clean, corrupted, answers, wrong)


def induction(tokenizer: Any, n: int, *, seed: int = 0, length: int = 20,
              token_range: tuple[int, int] = (1000, 10000), prepend_bos: bool = True) -> Task:
    """Repeated random tokens ``BOS r1..rL r1..rL``; every prediction inside the repeat is
    scored. Corrupted: a fresh first half; the wrong answer is the corrupted first half's token
    at the aligned position."""
    tok = _tokenizer(tokenizer)
    _check(n, token_range[1] - token_range[0] - 2 * length, "tokens")
    rng = random.Random(seed)
    bos = _bos(tok, prepend_bos)
    clean, corrupted, positions, answers, wrong = [], [], [], [], []
    offset = len(bos)
    scored = list(range(offset + length, offset + 2 * length - 1))
    for _ in range(n):
        pool = rng.sample(range(*token_range), 2 * length)
        x, fresh = pool[:length], pool[length:]
        seq, bad = bos + x + x, bos + fresh + x
        clean.append(seq)
        corrupted.append(bad)
        positions.append(scored)
        answers.append([seq[p + 1] for p in scored])
        wrong.append([bad[p + 1 - length] for p in scored])
    return _finish("induction", clean, corrupted, answers, wrong, positions=positions)
