"""Labelers write a label from evidence; simulators predict activations from a label alone.

Both sit behind small Protocols with async methods (``label()`` runs many units concurrently)
and sync wrappers. :class:`OpenAILabeler` is both, on the ``openai`` client and any
OpenAI-compatible server; :class:`OfflineLabeler` and :class:`OfflineSimulator` need no LLM.

>>> labeler = OpenAILabeler(model="gpt-4o-mini")                     # doctest: +SKIP
>>> local = OpenAILabeler(model="llama3.1", base_url="http://localhost:11434/v1", api_key="none")  # doctest: +SKIP
>>> bulk = OpenAILabeler(model="gpt-4o-mini", batch=True)            # Batch API: half price, <= 24 h  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tl_modular._aio import run_sync
from tl_modular.labeling._client import _closing
from tl_modular.labeling._evidence import Context, Evidence
from tl_modular.labeling._prompts import (
    EXPLANATION_SCHEMA,
    expected_activations,
    explanation_messages,
    simulation_messages,
    simulation_schema,
)


@dataclass
class Explanation:
    """A label: what drives the unit up (and, for signed units, down)."""

    text: str
    negative_text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    cached: bool = False


@dataclass
class Simulation:
    """Per-token predictions for each context on the 0…10 (−10…10) scale; None where a context's
    prediction failed (wrong length, missing) — counted in :attr:`failed`, never filled with zeros."""

    predictions: list[list[float] | None]
    usage: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    cached: bool = False

    @property
    def failed(self) -> int:
        return sum(p is None for p in self.predictions)

    def __iter__(self) -> Iterator[list[float] | None]:
        return iter(self.predictions)

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, i: int) -> list[float] | None:
        return self.predictions[i]


@runtime_checkable
class Labeler(Protocol):
    """Writes a label from a unit's evidence."""

    async def aexplain(self, evidence: Evidence) -> Explanation: ...


@runtime_checkable
class Simulator(Protocol):
    """Predicts a unit's per-token activations on contexts from its label alone."""

    async def asimulate(self, label: str, contexts: Sequence[Sequence[str]], *, signed: bool = False
                        ) -> Simulation: ...


class _Sync:
    def explain(self, evidence: Evidence) -> Explanation:
        """Sync :meth:`aexplain`."""
        return run_sync(_closing(self, self.aexplain(evidence)))  # type: ignore[attr-defined]

    def simulate(self, label: str, contexts: Sequence[Sequence[str]], *, signed: bool = False) -> Simulation:
        """Sync :meth:`asimulate`."""
        return run_sync(_closing(self, self.asimulate(label, contexts, signed=signed)))  # type: ignore[attr-defined]


# --- offline --------------------------------------------------------------------------------------

_CLAUSE = re.compile(r'(fires on|fires after|negative on|negative after) ((?:"(?:[^"\\]|\\.)*" \(-?\d+\)(?:, )?)+)')
_ITEM = re.compile(r'("(?:[^"\\]|\\.)*") \((-?\d+)\)')


class OfflineLabeler(_Sync):
    """A deterministic label from the evidence, no LLM: the tokens (or preceding tokens) with the
    highest mean activation in the shown contexts — token identity or previous token, and how
    many tokens, whichever predicts the shown activations best — with their mean on the 0…10
    scale, e.g. ``fires on "=" (9), "+" (4)``. Promoted tokens and member names are appended as
    plain text. :class:`OfflineSimulator` reads the quoted tokens back.

    Args:
        max_tokens: Tokens listed per clause.
        min_level: Least mean activation (0…10) for a token to be listed.
    """

    name = "offline"

    def __init__(self, *, max_tokens: int = 5, min_level: int = 2) -> None:
        if max_tokens < 1 or not 0 <= min_level <= 10:
            raise ValueError("max_tokens must be >= 1 and min_level in 0..10")
        self.max_tokens, self.min_level = max_tokens, min_level

    def _clause(self, ev: Evidence, contexts: list[Context], sign: int) -> str:
        """The clause whose predictions correlate best with the shown activations: 'on' (token
        identity) or 'after' (previous token), listing the k tokens of highest mean level."""
        best, best_r = "", 0.0
        for mode in ("on", "after"):
            keys, ys = [], []
            for c in contexts:
                for j, lv in enumerate(ev.levels(c.acts, signed=True)):
                    keys.append(c.tokens[j] if mode == "on" else (c.tokens[j - 1] if j > 0 else None))
                    ys.append(sign * lv)
            groups: dict[str, list[float]] = defaultdict(list)
            for k, y in zip(keys, ys, strict=True):
                if k is not None:
                    groups[k].append(y)
            means = {k: sum(v) / len(v) for k, v in groups.items()}
            ranked = sorted((k for k, m in means.items() if m >= self.min_level), key=lambda k: -means[k])
            y = np.asarray(ys, dtype=float)
            for n in range(1, min(self.max_tokens, len(ranked)) + 1):
                chosen = {k: means[k] for k in ranked[:n]}
                pred = np.asarray([chosen.get(k, 0.0) for k in keys])
                if pred.std() == 0 or y.std() == 0:
                    continue
                r = float(np.corrcoef(pred, y)[0, 1])
                if r > best_r + 1e-9:
                    items = ", ".join(f"{json.dumps(k, ensure_ascii=False)} ({round(sign * chosen[k])})"
                                      for k in ranked[:n])
                    best, best_r = f"{'fires' if sign > 0 else 'negative'} {mode} {items}", r
        return best

    async def aexplain(self, evidence: Evidence) -> Explanation:
        ev = evidence
        text = self._clause(ev, ev.top + ev.quantile + ev.random, +1) or "no consistent token pattern"
        extras = []
        offsets = [a["keys"][0][2] for a in ev.attention if a["keys"]]
        if offsets:
            common = max(set(offsets), key=offsets.count)
            if offsets.count(common) >= 0.6 * len(offsets):
                extras.append("attends to the current token" if common == 0 else
                              f"attends {common} token{'s' if common > 1 else ''} back")
        if ev.promoted:
            extras.append("promotes " + ", ".join(json.dumps(t, ensure_ascii=False) for t, _ in ev.promoted[:3]))
        if ev.member_labels:
            extras.append("combines " + ", ".join(ev.member_labels))
        negative = self._clause(ev, ev.bottom + ev.random, -1) if ev.bottom else ""
        full = "; ".join([text, *extras]) + (f"; {negative}" if negative else "")
        return Explanation(text=full, negative_text=negative)


class OfflineSimulator(_Sync):
    """Predicts activations from the quoted tokens of a label, no LLM: a token listed under
    ``fires on`` gets its level; one following a token listed under ``fires after`` gets that
    level; ``negative on/after`` the same with its negative level; everything else 0. Labels with
    no quoted tokens predict 0 everywhere (and score as uninformative)."""

    name = "offline"

    @staticmethod
    def parse(label: str) -> dict[str, dict[str, float]]:
        """``{"on": {token: level}, "after": {token: level}}`` from a label's clauses."""
        rules: dict[str, dict[str, float]] = {"on": {}, "after": {}}
        for clause, items in _CLAUSE.findall(label):
            mode = clause.split()[1]
            for tok, level in _ITEM.findall(items):
                try:
                    rules[mode][json.loads(tok)] = float(level)
                except json.JSONDecodeError:
                    continue
        return rules

    async def asimulate(self, label: str, contexts: Sequence[Sequence[str]], *, signed: bool = False
                        ) -> Simulation:
        rules = self.parse(label)
        lo = -10.0 if signed else 0.0
        preds: list[list[float] | None] = []
        for toks in contexts:
            row = []
            for j, t in enumerate(toks):
                v = rules["on"].get(t, 0.0) + (rules["after"].get(toks[j - 1], 0.0) if j > 0 else 0.0)
                row.append(max(lo, min(10.0, v)))
            preds.append(row)
        return Simulation(predictions=preds)


# --- OpenAI-compatible servers ---------------------------------------------------------------------

class OpenAILabeler(_Sync):
    """Labels and simulates with a chat model on the ``openai`` client (any OpenAI-compatible server).

    One explanation request and one batched simulation request per unit, through a
    :class:`~tl_modular.labeling._client.ChatClient`: retries with backoff that honour
    ``Retry-After``, a limit on requests in flight, a content-addressed response cache (a re-run
    costs nothing), token and cost accounting with a budget, and schema validation with one
    repair. Simulation asks for token log-probabilities and uses their expected value when the
    server returns them.

    Args:
        model: The chat model, e.g. ``"gpt-4o-mini"`` or a local server's model name.
        base_url: An OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp), e.g. ``http://localhost:8000/v1``.
        api_key: The key (default ``$OPENAI_API_KEY``); never written to a cache, log or report.
        client: A ready ``openai.AsyncOpenAI`` client instead of ``base_url``/``api_key``.
        config: A :class:`~tl_modular.labeling._client.ClientConfig` (concurrency, retries, cache, budget);
            ``model``/``base_url``/``api_key``/``cache_dir`` override its fields.
        cache_dir: The response cache folder. By default the user's cache,
            ``$XDG_CACHE_HOME/tl_modular/llm`` (``~/.cache/tl_modular/llm``), so a re-run costs nothing;
            ``False`` (or ``$TL_MODULAR_NO_LLM_CACHE=1``) for no cache.
        logprobs: Ask for token log-probabilities in simulation.
        batch: Send the requests through the OpenAI Batch API (half the price, answered within 24 hours):
            the labels of a level go in one batch, their simulations in the next; the batch ids are saved
            next to the response cache, so a run that dies and is started again resumes the same batches
            (:mod:`tl_modular.labeling._batch`). Default: ``config.batch`` (False).
    """

    name = "openai"

    def __init__(self, model: str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                 client: Any = None, config: Any = None, cache_dir: str | os.PathLike | bool | None = None,
                 logprobs: bool = True, batch: bool | None = None) -> None:
        from dataclasses import replace

        from tl_modular.labeling._client import ChatClient, ClientConfig, default_cache_dir

        cfg = config or ClientConfig()
        overrides = {k: v for k, v in {"model": model, "base_url": base_url, "api_key": api_key,
                                        "cache_dir": cache_dir, "batch": batch}.items() if v is not None}
        if cache_dir is None and cfg.cache_dir is None:     # cached by default, as Hugging Face caches are
            overrides["cache_dir"] = default_cache_dir()
        cfg = replace(cfg, **overrides)
        self.config = cfg
        self.client = ChatClient(cfg, client=client)
        self.logprobs = logprobs

    def __repr__(self) -> str:
        batch = ", batch=True" if self.config.batch else ""
        return f"OpenAILabeler(model={self.config.model!r}, base_url={self.client._public_url()!r}{batch})"

    async def aclose(self) -> None:
        """Close this event loop's connections (``label`` and the sync methods do it for you)."""
        await self.client.aclose()

    @property
    def usage(self) -> Any:
        """Running totals (requests, cached, retries, tokens, cost) over this labeler's life."""
        return self.client.usage

    async def aexplain(self, evidence: Evidence) -> Explanation:
        reply = await self.client.request(explanation_messages(evidence), EXPLANATION_SCHEMA, name="explanation",
                                          max_tokens=300)
        return Explanation(text=reply.data["label"].strip(), negative_text=reply.data["negative_label"].strip(),
                           usage=reply.usage.to_json(), cached=reply.cached)

    async def asimulate(self, label: str, contexts: Sequence[Sequence[str]], *, signed: bool = False
                        ) -> Simulation:
        n = len(contexts)
        if n == 0:
            return Simulation(predictions=[])
        use_lp = self.logprobs and not signed   # a sign and its digits come as separate tokens
        n_tokens = sum(len(c) for c in contexts)
        reply = await self.client.request(simulation_messages(label, contexts, signed), simulation_schema(n, signed),
                                          name="simulation", logprobs=use_lp,
                                          max_tokens=min(16_000, 64 + 4 * n_tokens + 16 * n))
        items = reply.data["contexts"]
        expected = expected_activations(reply.logprobs, sum(len(x["activations"]) for x in items)) if use_lp else None
        values = iter(expected) if expected is not None else None   # expectations replace sampled integers
        answers: dict[int, list[float]] = {}
        errors = []
        for item in items:
            acts = [next(values) for _ in item["activations"]] if values else [float(a) for a in item["activations"]]
            if item["id"] in answers:
                errors.append(f"context {item['id']} answered twice (the first answer is kept)")
                continue
            answers[item["id"]] = acts
        preds: list[list[float] | None] = []
        for i, toks in enumerate(contexts):
            a = answers.get(i)
            if a is None:
                errors.append(f"context {i}: no prediction")
            elif len(a) != len(toks):
                errors.append(f"context {i}: {len(a)} predictions for {len(toks)} tokens")
                a = None
            preds.append(a)
        return Simulation(predictions=preds, usage=reply.usage.to_json(), errors=errors, cached=reply.cached)
