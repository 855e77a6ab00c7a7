"""``label()``: evidence → explanation → simulation → scores, for every unit, concurrently."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from tl_modular import _dist
from tl_modular._aio import run_sync
from tl_modular._redact import redact
from tl_modular.errors import LabelingError
from tl_modular.labeling._client import REASONS, BudgetExceeded, LLMError, LLMUnavailable
from tl_modular.labeling._evidence import Evidence, EvidenceConfig, collect_evidence
from tl_modular.labeling._labelers import (
    Explanation,
    Labeler,
    OfflineLabeler,
    OfflineSimulator,
    Simulation,
    Simulator,
)
from tl_modular.labeling._labels import Label, Labels
from tl_modular.labeling._scoring import baseline_summary, holdout, score
from tl_modular.labeling._units import Unit, units_for

if TYPE_CHECKING:      # annotations only: the stages are imported when label() runs
    from tl_modular.circuits import CircuitSet
    from tl_modular.compression import Compression
    from tl_modular.graph import ChannelGraph
    from tl_modular.segmentation import ChannelSet


def _add_usage(total: dict[str, Any], part: dict[str, Any]) -> None:
    for k, v in part.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v


def _totals(*parts: Any) -> dict[str, Any]:
    """Summed running usage of the distinct labeler/simulator objects that keep one."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for p in parts:
        u = getattr(p, "usage", None)
        if u is not None and id(p) not in seen and hasattr(u, "to_json"):
            seen.add(id(p))
            _add_usage(out, u.to_json())
    return out


def _sim_text(exp: Explanation) -> str:
    return exp.text + (f" (negative: {exp.negative_text})" if exp.negative_text else "")


class _Run:
    """One labeling run: shared state for the coroutines."""

    def __init__(self, labeler: Labeler, simulator: Simulator, evidence: dict[str, Evidence], n_boot: int,
                 keep_evidence: bool, bar: Any) -> None:
        self.labeler, self.simulator, self.evidence = labeler, simulator, evidence
        self.n_boot, self.keep_evidence, self.bar = n_boot, keep_evidence, bar
        self.labels: dict[str, Label] = {}
        self.stopped: str | None = None
        self.baseline_usage: dict[str, Any] = {}

    async def all(self, units: list[Unit], n_baseline: int, seed: int, progress: bool) -> list[float]:
        """Label ``units`` (members before their modules) and score the baseline; the clients are
        closed at the end, also on error. Returns the baseline correlations."""
        try:
            await self.each(units, progress)
            return await self.baseline([u for u in units if u.kind != "module"], n_baseline, seed)
        finally:
            for obj in {id(self.labeler): self.labeler, id(self.simulator): self.simulator}.values():
                if hasattr(obj, "aclose"):
                    await obj.aclose()

    async def each(self, units: list[Unit], progress: bool) -> None:
        """Every unit, concurrently in rounds: members before their modules (a module's evidence
        holds its members' labels)."""
        self.bar = tqdm(total=len(units), desc="labeling", disable=not progress or not _dist.is_main(), leave=False)
        done: set[str] = set()
        names = {v.name for v in units}
        try:
            while len(done) < len(units):
                ready = [u for u in units if u.name not in done and all(m in done or m not in names for m in u.members)]
                if not ready:
                    raise ValueError("module membership has a cycle")
                await _all_or_none(self.one(u) for u in ready)
                done |= {u.name for u in ready}
        finally:
            self.bar.close()

    async def one(self, unit: Unit) -> None:
        ev = self.evidence[unit.name]
        ev.member_labels = {m: self.labels[m].text for m in unit.members if m in self.labels and self.labels[m].ok}
        lab = Label(unit=unit.name, kind=unit.kind, channels=list(unit.channels), members=list(unit.members),
                    labeler=getattr(self.labeler, "name", type(self.labeler).__name__),
                    evidence=ev.to_json() if self.keep_evidence else {})
        self.labels[unit.name] = lab
        try:
            if self.stopped:
                raise BudgetExceeded("the budget was spent by earlier requests")
            exp = await self.labeler.aexplain(ev)
            lab.text, lab.negative_text = exp.text, exp.negative_text
            _add_usage(lab.cost, exp.usage)
            contexts, _ = holdout(ev)
            sim = await self.simulator.asimulate(_sim_text(exp), [c.tokens for c in contexts], signed=ev.signed)
            _add_usage(lab.cost, sim.usage)
            sc = score(ev, sim.predictions, n_boot=self.n_boot)
            lab.score, lab.score_interval = sc.correlation, sc.interval
            lab.detection, lab.fuzzing = sc.detection, sc.fuzzing
            lab.n_scored, lab.failed_contexts = sc.n_contexts - sc.failed, sc.failed
            if sim.errors:
                lab.cost["simulation_errors"] = sim.errors[:5]
        except asyncio.CancelledError:   # stopped from outside (another unit's server cannot answer, Ctrl-C)
            self.labels.pop(unit.name, None)
            raise
        except BudgetExceeded:
            self.stopped = "budget"
            lab.status = "skipped: budget" if not lab.text else "unscored: budget"
            lab.failure = "budget"
        except LLMError as e:      # one unit's failure does not stop the others (LLMUnavailable stops all)
            lab.status = f"failed: {e}" if not lab.text else f"unscored: {e}"
            lab.failure = getattr(e, "reason", "error")
            if lab.text:
                lab.failed_contexts = len(ev.holdout_top) + len(ev.holdout_random)
            if isinstance(e, LLMUnavailable):
                raise
        finally:
            self.bar.update(1)

    async def baseline(self, units: list[Unit], n: int, seed: int) -> list[float]:
        """Correlations of other units' labels simulated on each unit's held-out contexts."""
        pool = [u for u in units if self.labels[u.name].ok and self.labels[u.name].score is not None]
        if len(pool) < 2 or n <= 0 or self.stopped:
            return []
        rng = np.random.default_rng(seed)
        chosen = [pool[i] for i in rng.permutation(len(pool))[:n]]
        # each unit gets a label drawn from another unit of the pool, never its own
        donors = [pool[(pool.index(u) + 1 + int(rng.integers(len(pool) - 1))) % len(pool)] for u in chosen]

        async def one(u: Unit, donor: Unit) -> float | None:
            ev = self.evidence[u.name]
            contexts, _ = holdout(ev)
            d = self.labels[donor.name]
            try:
                sim: Simulation = await self.simulator.asimulate(
                    _sim_text(Explanation(d.text, d.negative_text)), [c.tokens for c in contexts], signed=ev.signed)
            except LLMUnavailable:
                raise
            except LLMError:
                return None
            _add_usage(self.baseline_usage, sim.usage)
            return score(ev, sim.predictions, n_boot=0).correlation

        out = await _all_or_none(one(u, d) for u, d in zip(chosen, donors, strict=True))
        return [c for c in out if c is not None]


async def _all_or_none(coros: Iterable[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Results of ``coros`` run concurrently; at the first exception the others are cancelled (a
    server that cannot answer stops the batch at once, not after every request's retries)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:                 # cancelled from outside (Ctrl-C): take the tasks down too
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    # every exception is retrieved (asyncio would log the others as never retrieved); the first is raised
    errors = [t.exception() for t in tasks if t in done and not t.cancelled()]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return [t.result() for t in tasks]


def label(target: ChannelSet | Compression | ChannelGraph | Unit | Sequence[Unit], model: Any,
          tokens: Int[torch.Tensor, "batch pos"], *, labeler: Labeler | None = None, simulator: Simulator | None = None,
          attention_mask: Int[torch.Tensor, "batch pos"] | None = None, graph: ChannelGraph | None = None,
          circuits: CircuitSet | None = None, max_units: int | None = None, evidence: EvidenceConfig | None = None,
          n_baseline: int = 20, n_boot: int = 200, keep_evidence: bool = True, seed: int = 0, progress: bool = True,
          on_error: Literal["keep", "raise"] = "keep") -> Labels:
    """Label every unit of ``target`` and score each label by simulation.

    Args:
        target: A ChannelSet (its heads and MLPs), a Compression (each channel's top read and write
            directions), a ChannelGraph (its channels, then its modules, bottom-up: a module's
            evidence holds its members' labels), or a list of :class:`Unit` (neurons, SAE
            features ... from :mod:`tl_modular.labeling`).
        model: The HookedTransformer the units live in (left unchanged, no hooks remain).
        tokens: ``[batch, pos]`` token ids, one sequence per row; some rows are held out for scoring.
        labeler: Writes labels (default :class:`OfflineLabeler`, no LLM; or :class:`OpenAILabeler`).
        simulator: Predicts activations from labels (default: the labeler when it simulates too,
            else :class:`OfflineSimulator`).
        graph, circuits: For weight evidence (strongest routes) and the input categories using a unit;
            ``graph`` defaults to ``target`` when that is a ChannelGraph.
        max_units: Label at most this many units (modules first, then the others in order).
        evidence: How many contexts, windows, tokens to show (:class:`EvidenceConfig`).
        n_baseline: Units scored with a random (another unit's) label, for the baseline (at most
            the labeled units; ``labels.baseline["n"]`` says how many were).
        keep_evidence: Store what the labeler saw with each label.
        on_error: What to do when some units fail for a reason that may pass (a server error or
            rate limit after the retries, a timeout, an invalid answer): ``"keep"`` returns the
            labels with those units failed (``Label.failure``, ``Labels.failures()``) and warns
            with the count per reason — save them, and a re-run with the same ``cache_dir``
            asks only for what is missing; ``"raise"`` raises :class:`~tl_modular.LabelingError`
            (its ``labels`` hold the partial result).

    Returns:
        :class:`Labels` — budget stops and (with ``on_error="keep"``) failures recorded per label.

    Raises:
        LabelingError: At once, with the reason and the endpoint (never the key), when no request
            can succeed: no API key, a key the server refuses (401/403), an unknown model or route
            (404), a server that cannot be reached after the retries, or one that refuses the first
            requests and answers none. Units not yet asked are not sent.

    >>> labels = tlm.label(graph, model, tokens)                      # offline, no key needed
    >>> labels = tlm.label(graph, model, tokens, labeler=tlm.OpenAILabeler(model="gpt-4o-mini"))  # doctest: +SKIP
    """
    from tl_modular.graph import ChannelGraph

    _check_options(on_error, n_baseline, n_boot)
    labeler, simulator = _agents(labeler, simulator)
    if graph is None and isinstance(target, ChannelGraph):
        graph = target
    units = _at_most(units_for(target, model), max_units)
    ev = collect_evidence(units, model, tokens, attention_mask=attention_mask, config=evidence, graph=graph,
                          circuits=circuits, progress=progress)
    run = _Run(labeler, simulator, ev, n_boot, keep_evidence, None)
    # under torch.distributed the evidence scan above is data parallel; the labeler is asked on
    # rank 0 only (no request paid once per rank) and the labels sent to every rank
    result = _dist.on_main(lambda: _ask(run, units, n_baseline, seed, progress, evidence, tokens))
    _check_failures(result, on_error, labeler)
    return result


def _check_options(on_error: str, n_baseline: int, n_boot: int) -> None:
    if on_error not in ("keep", "raise"):
        raise ValueError(f"on_error must be 'keep' or 'raise', got {on_error!r}")
    if n_baseline < 0 or n_boot < 0:
        raise ValueError(f"n_baseline and n_boot must be >= 0, got n_baseline={n_baseline}, n_boot={n_boot}")


def _agents(labeler: Labeler | None, simulator: Simulator | None) -> tuple[Labeler, Simulator]:
    """The labeler and simulator to use (defaults filled in), checked against their protocols."""
    labeler = labeler if labeler is not None else OfflineLabeler()
    if simulator is None:
        simulator = labeler if isinstance(labeler, Simulator) else OfflineSimulator()
    if not isinstance(labeler, Labeler):
        raise TypeError(f"labeler must have an async aexplain(evidence) method (the Labeler protocol), "
                        f"got {type(labeler).__name__}")
    if not isinstance(simulator, Simulator):
        raise TypeError(f"simulator must have an async asimulate(label, contexts, signed=) method, "
                        f"got {type(simulator).__name__}")
    return labeler, simulator


def _at_most(units: list[Unit], max_units: int | None) -> list[Unit]:
    """At most ``max_units`` units: modules first, then the others in order; a module keeps only
    the members that are kept."""
    if max_units is None:
        return units
    if max_units < 1:
        raise ValueError(f"max_units must be >= 1, got {max_units}")
    modules = [u for u in units if u.kind == "module"][:max_units]
    leaves = [u for u in units if u.kind != "module"][:max_units - len(modules)]
    kept = {u.name for u in leaves}
    return leaves + [replace(u, members=tuple(m for m in u.members if m in kept)) for u in modules]


def _ask(run: _Run, units: list[Unit], n_baseline: int, seed: int, progress: bool, evidence: EvidenceConfig | None,
         tokens: torch.Tensor) -> Labels:
    """Run the labeling and return its Labels; a server that cannot answer raises LabelingError
    holding the labels made so far."""
    before = _totals(run.labeler, run.simulator)
    try:
        base = run_sync(run.all(units, n_baseline, seed, progress))
    except LLMUnavailable as e:     # the labels so far, from the run that was filling them
        partial = _labels(run, units, [], seed, before, evidence, tokens)
        raise LabelingError(f"labeling stopped: {e}", reason=e.reason, endpoint=e.endpoint,
                            labels=partial) from None
    return _labels(run, units, base, seed, before, evidence, tokens)


def _check_failures(result: Labels, on_error: str, labeler: Labeler) -> None:
    """Warn (``on_error="keep"``) or raise LabelingError (``"raise"``) when units failed."""
    # a spent budget is a stop the user asked for (Labels.stopped), not a failure
    failures = {r: n for r, n in result.failures().items() if r != "budget"}
    if not failures:
        return
    counts = ", ".join(f"{n} {REASONS.get(r, r)}" for r, n in failures.items())
    n_failed = sum(failures.values())
    if on_error == "raise":
        raise LabelingError(f"{n_failed} of {len(result)} units could not be labeled ({counts}); re-run with the "
                            "same cache_dir to ask only for those, or on_error='keep' for the partial labels",
                            reason="failures", endpoint=getattr(getattr(labeler, "client", None), "endpoint", None),
                            labels=result)
    warnings.warn(f"{n_failed} of {len(result)} units could not be labeled ({counts}); their labels say why "
                  "(Labels.failures()). Save the labels and re-run with the same cache_dir: only what is missing "
                  "is asked again", RuntimeWarning, stacklevel=3)        # the caller of label()


def _labels(run: _Run, units: list[Unit], base: list[float], seed: int, before: dict[str, Any],
            evidence: EvidenceConfig | None, tokens: torch.Tensor) -> Labels:
    """The Labels of a run (finished or stopped: units never started are left out); ``before``: the
    clients' running usage when it started."""
    labeler, simulator = run.labeler, run.simulator
    usage = _totals(labeler, simulator)
    if usage:       # the clients' own totals: failed and repaired requests included
        usage = {k: v - before.get(k, 0) for k, v in usage.items()}
    else:
        for lab in run.labels.values():
            _add_usage(usage, lab.cost)
        _add_usage(usage, run.baseline_usage)
    cfg = {"labeler": redact(repr(labeler)), "simulator": redact(repr(simulator)), "n_units": len(units),
           "n_sequences": int(tokens.shape[0]), "evidence": (evidence or EvidenceConfig()).__dict__}
    return Labels([run.labels[u.name] for u in units if u.name in run.labels],
                  baseline=baseline_summary(base, seed=seed), usage=usage, config=cfg, stopped=run.stopped)

