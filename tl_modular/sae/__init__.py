"""Sparse autoencoders on the channels' hooks (sae-lens): polysemanticity and unfolding.

tl_modular uses sae-lens' SAEs — pretrained ones by release and id, ones you trained, or the
ones shipped for the bundled model — never a home-made SAE class.

- Attach: :func:`load` (release + id from the hub cache, or a folder), :func:`check_fits`,
  :class:`SAESet` (SAEs keyed by hook), :func:`bundled` (trained SAEs for the bundled model).
- Run: :func:`spliced` (reconstructions in place of activations, optionally keeping the error
  term and editing features), :func:`quality` (FVU, CE loss recovered, L0, dead features).
- Train: :func:`train_sae` (sae-lens' ``SAETrainer`` on a model and in-memory tokens, no wandb),
  :func:`train_transcoder` (an MLP's input → output through sparse features, as a sae-lens
  ``Transcoder``), :func:`train_on_activations` (any activation stream).
- Measure: :func:`polysemanticity` (effective number of features driving a unit),
  :func:`feature_spread` (effective number of units a feature reaches), :func:`score_model`
  (a ranked table over every neuron and read direction).
- Unfold: :func:`unfold` (a channel's read/write subspace in feature terms), :func:`expand`
  (the channel graph with feature nodes and an error node).

>>> import tl_modular as tlm
>>> model = tlm.toy.load_model()
>>> saes = tlm.sae.bundled(model)                                    # doctest: +SKIP
>>> tokens, mask = tlm.toy.mixed_tokens(n_per_task=128)
>>> table = tlm.sae.score_model(model, saes, tokens, attention_mask=mask)   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tl_modular.sae._attach import (
    SAESet,
    check_fits,
    collect,
    feature_directions,
    hook_name,
    load,
    quality,
    save_atomic,
    spliced,
)
from tl_modular.sae._poly import PolysemanticityTable, UnitScores, feature_spread, polysemanticity, score_model
from tl_modular.sae._readers import Readers, neuron_readers, readers_for, subspace_readers
from tl_modular.sae._train import SAETrainConfig, train_on_activations, train_sae
from tl_modular.sae._transcoder import train_transcoder
from tl_modular.sae._unfold import Unfolding, expand, unfold

#: Where the SAEs trained for the bundled model live (one sae-lens folder per hook).
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

__all__ = [
    "BUNDLED_DIR", "PolysemanticityTable", "Readers", "SAESet", "SAETrainConfig", "UnitScores", "Unfolding",
    "bundled", "check_fits", "collect", "expand", "feature_directions", "feature_spread", "hook_name", "load",
    "neuron_readers", "polysemanticity", "quality", "readers_for", "save_atomic", "score_model", "spliced",
    "subspace_readers", "train_on_activations", "train_sae", "train_transcoder", "unfold",
]


def bundled(model: Any | None = None, *, device: str = "cpu") -> SAESet:
    """The SAEs shipped for the bundled model (``tlm.toy.load_model()``), checked against ``model``.

    Trained by ``python tools/train_toy_saes.py`` on its residual stream (``hook_resid_pre`` and
    ``hook_resid_mid`` of both layers) and MLP outputs (``hook_mlp_out``).
    """
    if not BUNDLED_DIR.is_dir():
        raise FileNotFoundError(f"no bundled SAEs at {BUNDLED_DIR}: run `python tools/train_toy_saes.py`")
    return SAESet.load(BUNDLED_DIR, model, device=device)
