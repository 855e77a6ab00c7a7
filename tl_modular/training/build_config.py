"""The settings of :func:`~tl_modular.training.build_interpretable`: :class:`BuildConfig`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["BuildConfig"]


@dataclass(kw_only=True)
class BuildConfig:
    """Settings of :func:`~tl_modular.training.build_interpretable` (validated).

    Attributes:
        layers: Layers to build, in order: ``None`` every layer, an int that layer and all after
            it, or a sequence of layers.
        steps_per_layer: Training steps while a layer is matched to its labels.
        match_weight: Weight of the match term against the task loss.
        keep_free: Neurons per layer left out of the match term (the worst-labeled ones).
        neurons: Label and constrain only the first ``neurons`` neurons of each layer (``None``: all);
            the others train freely like ``keep_free`` ones.
        n_contexts: Training contexts simulated per layer (rows of the labeling's explanation split):
            the simulator's cost per neuron is bounded by this.
        n_heldout: Held-out rows simulated too, for the fixed-label correlation on unseen data (0: skip).
        match_batch: Contexts per step in the match term.
        final_steps: Steps on the original objective alone after the last layer is frozen.
        lr, batch_size, warmup, weight_decay, eval_every, seed: Passed to :func:`tl_modular.toy.train`
            for every phase (a fresh optimizer and schedule per phase). Weight decay is off by
            default: in a short fine-tune it only adds drift unrelated to the labels.
        checkpoint_every: Steps between the phase checkpoints (with ``checkpoint_dir``).
        n_label_rows: Rows per task drawn for the labeling tokens when ``tokens`` is not given.
        n_boot: Bootstrap samples for the label scores' intervals (0: none; they are costly).
        evidence: The :class:`tl_modular.labeling.EvidenceConfig` of every labeling.
    """

    layers: int | Sequence[int] | None = None
    steps_per_layer: int = 200
    match_weight: float = 1.0
    keep_free: int = 0
    neurons: int | None = None
    n_contexts: int = 128
    n_heldout: int = 64
    match_batch: int = 32
    final_steps: int = 0
    lr: float = 3e-4
    batch_size: int = 64
    warmup: int = 20
    weight_decay: float = 0.0
    eval_every: int = 50
    checkpoint_every: int = 100
    n_label_rows: int = 64
    n_boot: int = 0
    evidence: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps_per_layer", "n_contexts", "match_batch", "batch_size", "eval_every",
                     "checkpoint_every", "n_label_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BuildConfig.{name} must be a positive int, got {v!r}")
        for name in ("keep_free", "n_heldout", "final_steps", "warmup", "n_boot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"BuildConfig.{name} must be an int >= 0, got {v!r}")
        if not (isinstance(self.match_weight, (int, float)) and math.isfinite(self.match_weight)
                and self.match_weight >= 0):
            raise ValueError(f"BuildConfig.match_weight must be a finite number >= 0, got {self.match_weight!r}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"BuildConfig needs lr > 0 and weight_decay >= 0, got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}")
        if self.neurons is not None and (isinstance(self.neurons, bool) or int(self.neurons) < 1):
            raise ValueError(f"BuildConfig.neurons must be None or a positive int, got {self.neurons!r}")
        if self.neurons is not None and self.keep_free >= self.neurons:
            raise ValueError(f"keep_free={self.keep_free} leaves none of the {self.neurons} labeled neurons "
                             "constrained; lower keep_free or raise neurons")
        if self.layers is not None and not isinstance(self.layers, int):
            layers = list(self.layers)
            if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise ValueError(f"BuildConfig.layers must be None, an int or a non-empty sequence of ints, "
                                 f"got {self.layers!r}")
            self.layers = tuple(sorted(set(layers)))
        if self.evidence is None:
            from tl_modular.labeling import EvidenceConfig
            self.evidence = EvidenceConfig(seed=self.seed)

    def resolve_layers(self, n_layers: int) -> list[int]:
        """The layers to build, checked against the model's ``n_layers``."""
        if self.layers is None:
            layers = list(range(n_layers))
        elif isinstance(self.layers, int):
            layers = list(range(self.layers, n_layers))
        else:
            layers = list(self.layers)
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad or not layers:
            raise ValueError(f"layers {self.layers!r} name no valid layer of a {n_layers}-layer model "
                             f"(bad: {bad}); choose layers in 0..{n_layers - 1}")
        return layers

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "evidence"}
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        d["evidence"] = dict(vars(self.evidence))
        return d
