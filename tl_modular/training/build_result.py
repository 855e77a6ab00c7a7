"""What :func:`~tl_modular.training.build_interpretable` returns: a :class:`LayerRecord` per layer
in a :class:`BuildResult`, and how a result is written."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tl_modular._io import SCHEMA_VERSION, bind_files, write_json, write_safetensors
from tl_modular._names import layer_name
from tl_modular.training.build_config import BuildConfig

__all__ = ["BuildResult", "LayerRecord"]

_SCHEMA = "tl_modular.build_interpretable"
_MODEL = "model.safetensors"


@dataclass
class LayerRecord:
    """What happened to one layer.

    Attributes:
        layer: The layer.
        labeled, constrained, free: Neuron indices labeled, matched to their labels, and left free
            (``keep_free``, failed labels or simulations).
        scores: Label scores (held-out correlation, :mod:`tl_modular.labeling`) of the constrained
            neurons: ``{"before": {"mean", "median", "n"}, "after": {...}}``; ``free_scores`` alike.
        fidelity: Mean correlation of the *fixed* labels' simulations with the neurons' activations,
            ``{"train_before", "train_after", "heldout_before", "heldout_after"}`` — did the neurons
            come to do what their labels say, on the training contexts and on held-out rows.
        match_loss: The match term on all training contexts, ``{"before", "after"}``.
        loss, accuracy: The original loss (mean cross-entropy over the evaluation tasks) and
            per-task accuracy, ``{"before", "after"}``.
        frozen: Parameter names frozen after this layer (cumulative).
        history: The phase's training history (:func:`tl_modular.toy.train` records).
        labels_before, labels_after: The :class:`tl_modular.labeling.Labels` themselves.
    """

    layer: int
    labeled: list[int]
    constrained: list[int]
    free: list[int]
    scores: dict[str, Any] = field(default_factory=dict)
    free_scores: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, float | None] = field(default_factory=dict)
    match_loss: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    labels_before: Any = field(default=None, repr=False)
    labels_after: Any = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("labels_before", "labels_after")}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LayerRecord:
        known = set(cls.__dataclass_fields__) - {"labels_before", "labels_after"}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class BuildResult:
    """What :func:`~tl_modular.training.build_interpretable` returns: the built model (a copy) and one record
    per layer."""

    model: Any
    layers: list[LayerRecord]
    initial: dict[str, Any]
    final: dict[str, Any]
    config: BuildConfig
    final_history: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, layer: int) -> LayerRecord:
        for r in self.layers:
            if r.layer == layer:
                return r
        raise KeyError(f"layer {layer} was not built; built: {[r.layer for r in self.layers]}")

    def to_json(self) -> dict[str, Any]:
        return {"schema": _SCHEMA, "version": SCHEMA_VERSION, "config": self.config.to_json(),
                "initial": self.initial, "final": self.final, "layers": [r.to_json() for r in self.layers],
                "final_history": self.final_history}

    def to_markdown(self) -> str:
        """Per layer: label scores and fixed-label fidelity before → after, match loss, original loss."""
        def f(x: Any) -> str:
            return "–" if x is None else f"{x:.3f}"

        def g(x: Any) -> str:      # losses span orders of magnitude
            return "–" if x is None else f"{x:.3g}"
        rows = ["| layer | constrained | label score (mean) | label score (median) | fidelity (train) | "
                "fidelity (held-out) | match loss | original loss |", "|---|---|---|---|---|---|---|---|"]
        for r in self.layers:
            b, a = r.scores.get("before", {}), r.scores.get("after", {})
            fd, m, lo = r.fidelity, r.match_loss, r.loss
            rows.append(f"| {r.layer} | {len(r.constrained)} | {f(b.get('mean'))} → {f(a.get('mean'))} | "
                        f"{f(b.get('median'))} → {f(a.get('median'))} | {f(fd.get('train_before'))} → "
                        f"{f(fd.get('train_after'))} | {f(fd.get('heldout_before'))} → {f(fd.get('heldout_after'))}"
                        f" | {g(m.get('before'))} → {g(m.get('after'))} | {g(lo.get('before'))} → "
                        f"{g(lo.get('after'))} |")
        return "\n".join(rows)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``result.json``, the model (``model.safetensors``) and each layer's labels (atomic)."""
        directory = Path(directory)
        # the model first, result.json last binding it (no reader mixes two saves)
        write_safetensors(directory / _MODEL, self.model.state_dict(), {"kind": "build_interpretable_model",
                                                                        "bound_to": "result.json"})
        write_json(directory / "result.json", {**self.to_json(), "files": bind_files(directory, [_MODEL])})
        for r in self.layers:
            for when in ("before", "after"):
                labels = getattr(r, f"labels_{when}")
                if labels is not None:
                    labels.save(directory / layer_name(r.layer) / f"labels_{when}.json")
        return directory
