"""Bounded memory of the fidelity scores (issue 22: ``analyze``'s rank–fidelity stage peaked at 8.2 GB
at GPT-2-small shape): the log-softmax, CE and KL run in chunks of a batch's rows
(``fidelity.CHUNK_MEMORY``) and the clean log-probs are kept only within ``CLEAN_MEMORY`` (run again
per score beyond it), with the same floats as the whole batch at once."""

from __future__ import annotations

import pytest
import torch

from tl_modular.compression import compress, fidelity
from tl_modular.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("clean_loss", "ablated_loss", "compressed_loss", "kl")


def _reference(model, comp, tokens, mask, batch_size):
    """The scores from whole batches, written out independently: fp32 log-softmax of every batch at
    once, each batch's weighted sums in fp32 and the batches added in Python floats."""
    weights = mask[:, 1:].float()
    sums = {"clean": 0.0, "ablated": 0.0, "compressed": 0.0, "kl": 0.0}
    for s in range(0, tokens.shape[0], batch_size):
        t, m, w = tokens[s:s + batch_size], mask[s:s + batch_size], weights[s:s + batch_size]
        runs = {}
        for name, ctx in (("clean", None), ("ablated", comp.truncated(rank=0)), ("compressed", comp)):
            with torch.no_grad():
                if ctx is None:
                    logits = model(t, attention_mask=m)
                else:
                    with ctx.applied(model):
                        logits = model(t, attention_mask=m)
            runs[name] = lp = logits[:, :-1].float().log_softmax(-1)
            sums[name] += float((-lp.gather(-1, t[:, 1:, None])[..., 0] * w).sum())
        c, q = runs["clean"], runs["compressed"]
        sums["kl"] += float(((c.exp() * (c - q)).sum(-1) * w).sum())
    total = float(weights.sum())
    return {"clean_loss": sums["clean"] / total, "ablated_loss": sums["ablated"] / total,
            "compressed_loss": sums["compressed"] / total, "kl": sums["kl"] / total}


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gpt2", seed=5)
    tokens = torch.randint(0, 50, (11, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(tokens)
    mask[3, 6:] = 0                     # padding: excluded predictions
    mask[8, 4:] = 0
    comp = compress(model, tokens, attention_mask=mask, progress=False).truncated(rank=2)
    return model, tokens, mask, comp


@pytest.mark.parametrize("chunk, clean", [(1 << 30, 1 << 30),   # one chunk per batch, every clean batch kept
                                          (1, 1 << 30),         # one row per chunk
                                          (1, 0),               # ... and the clean batches run per score
                                          (3 * 8 * 50 * 4, 4 * 8 * 50 * 4 * 2)])   # 3 rows a chunk; 2 of 3 kept
def test_fidelity_in_chunks_equals_whole_batches(setup, monkeypatch, chunk, clean):
    model, tokens, mask, comp = setup
    monkeypatch.setattr(fidelity, "CHUNK_MEMORY", chunk)
    monkeypatch.setattr(fidelity, "CLEAN_MEMORY", clean)
    ref = _reference(model, comp, tokens, mask, batch_size=4)
    got = fidelity.fidelity(model, comp, tokens, attention_mask=mask, batch_size=4)
    assert ref["kl"] > 1e-3 and ref["ablated_loss"] > ref["compressed_loss"] > 0   # a real comparison
    # the same per-prediction floats summed over the same tensors: bitwise
    assert {k: got[k] for k in KEYS} == ref


def test_chunks_and_kept_clean_batches(setup, monkeypatch):
    model, tokens, mask, comp = setup
    logits = torch.zeros(5, 9, 50)
    monkeypatch.setattr(fidelity, "CHUNK_MEMORY", 2 * 8 * 50 * 4)           # two rows of 8 predictions
    assert fidelity._row_chunks(logits) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    monkeypatch.setattr(fidelity, "CHUNK_MEMORY", 1)
    assert len(fidelity._row_chunks(logits)) == 5                          # never less than a row
    monkeypatch.setattr(fidelity, "CLEAN_MEMORY", 4 * 8 * 50 * 4 * 2)      # two batches of 4 rows
    ref = fidelity._Reference(model, comp, tokens, 4, mask, None)
    assert [c is not None for c in ref.clean] == [True, True, False]
    assert all(c.shape == (4, 8, 50) for c in ref.clean[:2])
    curve = fidelity.rank_fidelity_curve(model, comp, tokens, [1, comp.total_rank], attention_mask=mask,
                                         batch_size=4, progress=False)
    for row, budget in zip(curve, (1, comp.total_rank), strict=True):   # the points share the clean runs
        alone = fidelity.fidelity(model, comp.truncated(budget=budget), tokens, attention_mask=mask, batch_size=4)
        assert {k: row[k] for k in KEYS} == {k: alone[k] for k in KEYS}
    assert curve[0]["kl"] > curve[1]["kl"]
