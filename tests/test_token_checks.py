"""One token check at every public entry that takes tokens, and one weight check before a pass reads
weights: an id outside ``[0, d_vocab)`` or a NaN parameter is refused with a message naming the
argument (or parameter), the value and the vocabulary size, not answered with wrapped-around
labels, a bare ``IndexError`` from inside TransformerLens, or a ``LinAlgError``."""

from __future__ import annotations

import _bad
import pytest
import torch

import tl_modular as tlm
from tl_modular.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_graph):
    from sae_lens import StandardSAE, StandardSAEConfig

    model, data, comp, graph = tiny_graph
    cfg = StandardSAEConfig(d_in=model.cfg.d_model, d_sae=32)
    cfg.metadata.hook_name = "blocks.1.hook_resid_mid"
    return model, data, comp, graph, StandardSAE(cfg)


def _with(data: torch.Tensor, value: int) -> torch.Tensor:
    bad = data.clone()
    bad[2, 5] = value
    return bad


ENTRIES = {
    "label": (lambda w, t: tlm.label(tlm.labeling.neurons(w[0], 0, [0, 1]), w[0], t, n_baseline=0, n_boot=5,
                                     progress=False), r"tokens\[2, 5\]"),
    "circuits": (lambda w, t: w[3].circuits(w[0], {"all": t[:8]}, n_boot=5, n_random=1, search="greedy",
                                            progress=False), r"categories\['all'\]\[2, 5\]"),
    "fidelity": (lambda w, t: w[2].fidelity(w[0], t), r"tokens\[2, 5\]"),
    "sae.quality": (lambda w, t: tlm.sae.quality(w[0], w[4], t), r"tokens\[2, 5\]"),
    "compress": (lambda w, t: tlm.compress(w[0], t, progress=False), r"tokens\[2, 5\]"),
    "build_graph": (lambda w, t: tlm.build_graph(w[2], model=w[0], tokens=t, progress=False), r"tokens\[2, 5\]"),
}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("value", [-1, 50, 10**6])
def test_token_ids_outside_the_vocabulary_are_refused(world, entry, value):
    call, where = ENTRIES[entry]
    assert world[0].cfg.d_vocab == 50
    with _bad.raises(ValueError, match=rf"{where} = {value} is not a token id .*d_vocab=50"):
        call(world, _with(world[1], value))


def test_compress_names_the_first_non_finite_parameter(world):
    model, data = tiny_model("gpt2", seed=0), world[1]
    with torch.no_grad():
        model.blocks[1].mlp.W_in[3, 4] = float("nan")
        model.blocks[1].attn.W_O[0, 0, 0] = float("inf")
    with _bad.raises(ValueError, match=r"compress: the model's parameter blocks.1.attn.W_O holds 1 non-finite"):
        tlm.compress(model, data, progress=False)
    with _bad.raises(ValueError, match=r"build_graph: the model's parameter blocks.1.attn.W_O"):
        tlm.build_graph(world[2], model=model, tokens=data, progress=False)
