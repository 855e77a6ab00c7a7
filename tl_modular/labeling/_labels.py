"""Labels: text, scores, evidence and cost per unit, saved to and loaded from JSON."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

from tl_modular._io import SCHEMA_VERSION, read_versioned_json, reading, write_json
from tl_modular._redact import redact_obj
from tl_modular.labeling._client import REASONS

_SCHEMA = "tl_modular.labels"


@dataclass(kw_only=True)
class Label:
    """The label of one unit.

    Attributes:
        unit, kind: The unit's name and kind (see :class:`~tl_modular.labeling.Unit`).
        text: What drives the unit up; ``negative_text`` what drives it down (signed units).
        status: ``"ok"``, ``"failed: <why>"``, ``"unscored: <why>"`` (labeled, the simulation
            failed) or ``"skipped: budget"``.
        failure: Why it is not ok, as a short code (``"server_error"``, ``"rate_limited"``,
            ``"timeout"``, ``"invalid_answer"``, ``"budget"`` ...; see ``LLMError.reason``), or ``""``.
        score: Correlation of simulated and true activations on held-out contexts (None when not
            scored), ``score_interval`` its 95% bootstrap interval, ``detection`` and ``fuzzing``
            balanced accuracies (see :mod:`~tl_modular.labeling._scoring`).
        failed_contexts: Held-out contexts whose simulation failed (left out of the scores).
        cost: Requests, cached replies, retries, tokens and USD spent on this unit.
        evidence: What the labeler was shown (JSON), for audit.
    """

    unit: str
    kind: str
    text: str = ""
    negative_text: str = ""
    status: str = "ok"
    failure: str = ""
    score: float | None = None
    score_interval: tuple[float, float] | None = None
    detection: float | None = None
    fuzzing: float | None = None
    n_scored: int = 0
    failed_contexts: int = 0
    channels: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    labeler: str = ""
    cost: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self, *, evidence: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["score_interval"] = list(self.score_interval) if self.score_interval is not None else None
        if not evidence:
            d.pop("evidence")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Label:
        if not isinstance(d, dict):
            raise TypeError(f"a label must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("score_interval") is not None:
            d["score_interval"] = tuple(d["score_interval"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


class Labels(Sequence[Label]):
    """Labels in the order they were made (members before their modules), indexable by unit name.

    Attributes:
        baseline: Correlation of random labels (another unit's label simulated on this unit's
            held-out contexts): ``{"n", "mean", "interval"}`` — what a label must beat.
        usage: Totals over the run (requests, cached, retries, tokens, cost).
        stopped: Why the run stopped early (``"budget"``), or None.

    >>> labels = tlm.label(graph, model, tokens)              # doctest: +SKIP
    >>> labels["L1.H2"].text, labels["L1.H2"].score           # doctest: +SKIP
    >>> labels.save("labels.json"); tlm.labeling.Labels.load("labels.json")   # doctest: +SKIP
    """

    def __init__(self, labels: Sequence[Label], *, baseline: dict[str, Any] | None = None,
                 usage: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                 stopped: str | None = None) -> None:
        self._labels = list(labels)
        self._by_name = {lab.unit: lab for lab in self._labels}
        if len(self._by_name) != len(self._labels):
            raise ValueError("two labels for the same unit")
        self.baseline = baseline or {"n": 0, "mean": None, "interval": None}
        self.usage = usage or {}
        self.config = config or {}
        self.stopped = stopped

    @overload
    def __getitem__(self, key: int) -> Label: ...
    @overload
    def __getitem__(self, key: slice) -> list[Label]: ...
    @overload
    def __getitem__(self, key: str) -> Label: ...

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key not in self._by_name:
                raise KeyError(f"no label for {key!r}; units: {list(self._by_name)[:8]}...")
            return self._by_name[key]
        return self._labels[key]

    def __contains__(self, key: object) -> bool:
        return key in self._by_name if isinstance(key, str) else key in self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def __iter__(self) -> Iterator[Label]:
        return iter(self._labels)

    def failures(self) -> dict[str, int]:
        """How many labels are not ok, per reason (``Label.failure``), most frequent first."""
        counts: dict[str, int] = {}
        for lab in self._labels:
            if not lab.ok:
                reason = lab.failure or lab.status.partition(":")[0] or "error"
                counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def __repr__(self) -> str:
        ok = [lab for lab in self._labels if lab.ok]
        scores = [lab.score for lab in ok if lab.score is not None]
        mean = f"{sum(scores) / len(scores):.2f}" if scores else "n/a"
        base = self.baseline.get("mean")
        failed = ", ".join(f"{n} {REASONS.get(r, r)}" for r, n in self.failures().items())
        stopped = f", stopped: {self.stopped}" if self.stopped else ""
        return (f"Labels({len(ok)}/{len(self)} labeled, mean score {mean}, random-label baseline "
                f"{'n/a' if base is None else f'{base:.2f}'}, {self.usage.get('requests', 0)} requests"
                f"{', not labeled: ' + failed if failed else ''}{stopped})")

    def to_markdown(self, n: int | None = None) -> str:
        """A table: unit, label, score [interval], detection, fuzzing."""
        def f(x: float | None) -> str:
            return "–" if x is None else f"{x:.2f}"
        rows = ["| unit | label | score | detection | fuzzing |", "|---|---|---|---|---|"]
        for lab in self._labels[:n]:
            iv = f" [{lab.score_interval[0]:.2f}, {lab.score_interval[1]:.2f}]" if lab.score_interval else ""
            text = lab.text.replace("|", "\\|") if lab.ok else f"({lab.status})"
            rows.append(f"| {lab.unit} | {text} | {f(lab.score)}{iv} | {f(lab.detection)} | {f(lab.fuzzing)} |")
        return "\n".join(rows)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the labels as JSON (atomic); a directory gets ``labels.json`` inside."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "labels.json"
        # no secret is written: an LLM that echoed a key into a label or an error has it masked
        write_json(path, redact_obj({"schema": _SCHEMA, "version": SCHEMA_VERSION, "config": self.config,
                                     "baseline": self.baseline, "usage": self.usage, "stopped": self.stopped,
                                     "labels": [lab.to_json() for lab in self._labels]}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Labels:
        """Read labels written by :meth:`save`."""
        path = Path(path)
        if path.is_dir():
            path = path / "labels.json"
        if not path.exists():
            raise FileNotFoundError(f"no labels at {path}; write them with Labels.save")
        meta = read_versioned_json(path, None, _SCHEMA, "Labels.save (re-run the labeling)", required=("labels",))
        with reading(path, "Labels.save (re-run the labeling)"):
            return cls([Label.from_json(d) for d in meta["labels"]], baseline=meta.get("baseline"),
                       usage=meta.get("usage"), config=meta.get("config"), stopped=meta.get("stopped"))
