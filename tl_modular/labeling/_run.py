"""``label()``: evidence → explanation → simulation → scores, for every unit, concurrently."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from tl_modular.labeling._client import _run
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

    async def one(self, unit: Unit) -> None:
        from tl_modular.labeling._client import BudgetExceeded, LLMError

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
        except BudgetExceeded:
            self.stopped = "budget"
            lab.status = "skipped: budget" if not lab.text else "unscored: budget"
        except LLMError as e:      # one unit's failure does not stop the others
            lab.status = f"failed: {e}" if not lab.text else f"unscored: {e}"
            if lab.text:
                lab.failed_contexts = len(ev.holdout_top) + len(ev.holdout_random)
        finally:
            self.bar.update(1)

    async def baseline(self, units: list[Unit], n: int, seed: int) -> list[float]:
        """Correlations of other units' labels simulated on each unit's held-out contexts."""
        from tl_modular.labeling._client import LLMError

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
            except LLMError:
                return None
            _add_usage(self.baseline_usage, sim.usage)
            return score(ev, sim.predictions, n_boot=0).correlation

        out = await asyncio.gather(*(one(u, d) for u, d in zip(chosen, donors, strict=True)))
        return [c for c in out if c is not None]


def label(target: Any, model: Any, tokens: Int[torch.Tensor, "batch pos"], *,
          labeler: Labeler | None = None, simulator: Simulator | None = None,
          attention_mask: Int[torch.Tensor, "batch pos"] | None = None, graph: Any = None, circuits: Any = None,
          max_units: int | None = None, evidence: EvidenceConfig | None = None, n_baseline: int = 20,
          n_boot: int = 200, keep_evidence: bool = True, seed: int = 0, progress: bool = True) -> Labels:
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
        n_baseline: Units scored with a random (another unit's) label, for the baseline.
        keep_evidence: Store what the labeler saw with each label.

    Returns:
        :class:`Labels` — failures and budget stops are recorded per label, never raised midway.

    >>> labels = tlm.label(graph, model, tokens)                      # offline, no key needed
    >>> labels = tlm.label(graph, model, tokens, labeler=tlm.OpenAILabeler(model="gpt-4o-mini"))  # doctest: +SKIP
    """
    from tl_modular.graph import ChannelGraph

    labeler = labeler if labeler is not None else OfflineLabeler()
    if simulator is None:
        simulator = labeler if isinstance(labeler, Simulator) else OfflineSimulator()
    if not isinstance(labeler, Labeler):
        raise TypeError(f"labeler must have an async aexplain(evidence) method (the Labeler protocol), "
                        f"got {type(labeler).__name__}")
    if not isinstance(simulator, Simulator):
        raise TypeError(f"simulator must have an async asimulate(label, contexts, signed=) method, "
                        f"got {type(simulator).__name__}")
    if graph is None and isinstance(target, ChannelGraph):
        graph = target
    units = units_for(target, model)
    if max_units is not None:
        if max_units < 1:
            raise ValueError(f"max_units must be >= 1, got {max_units}")
        modules = [u for u in units if u.kind == "module"][:max_units]
        leaves = [u for u in units if u.kind != "module"][:max_units - len(modules)]
        kept = {u.name for u in leaves}
        units = leaves + [replace(u, members=tuple(m for m in u.members if m in kept)) for u in modules]
    ev = collect_evidence(units, model, tokens, attention_mask=attention_mask, config=evidence, graph=graph,
                          circuits=circuits, progress=progress)

    async def main() -> tuple[_Run, list[float]]:
        try:
            return await work()
        finally:
            for obj in {id(labeler): labeler, id(simulator): simulator}.values():
                if hasattr(obj, "aclose"):
                    await obj.aclose()

    async def work() -> tuple[_Run, list[float]]:
        bar = tqdm(total=len(units), desc="labeling", disable=not progress, leave=False)
        run = _Run(labeler, simulator, ev, n_boot, keep_evidence, bar)
        # members before their modules: a module's evidence holds its members' labels
        done = set()
        while len(done) < len(units):
            ready = [u for u in units if u.name not in done
                     and all(m in done or m not in {v.name for v in units} for m in u.members)]
            if not ready:
                raise ValueError("module membership has a cycle")
            await asyncio.gather(*(run.one(u) for u in ready))
            done |= {u.name for u in ready}
        bar.close()
        base = await run.baseline([u for u in units if u.kind != "module"], n_baseline, seed)
        return run, base

    before = _totals(labeler, simulator)
    run, base = _run(main())
    usage = _totals(labeler, simulator)
    if usage:       # the clients' own totals: failed and repaired requests included
        usage = {k: v - before.get(k, 0) for k, v in usage.items()}
    else:
        for lab in run.labels.values():
            _add_usage(usage, lab.cost)
        _add_usage(usage, run.baseline_usage)
    cfg = {"labeler": repr(labeler), "simulator": repr(simulator), "n_units": len(units),
           "n_sequences": int(tokens.shape[0]), "evidence": (evidence or EvidenceConfig()).__dict__}
    return Labels([run.labels[u.name] for u in units], baseline=baseline_summary(base, seed=seed), usage=usage,
                  config=cfg, stopped=run.stopped)

