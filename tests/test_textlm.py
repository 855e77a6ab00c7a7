"""The bundled real-text GPT-2: loaded through TransformerLens' own conversion, with its facts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tl_modular as tlm

LOSS = 2.512      # measured on the first 2,048 held-out tokens in rows of 128


@pytest.fixture(scope="module")
def model():
    return tlm.textlm.load_model()


def test_gpt2_architecture_exactly_through_the_from_pretrained_conversion(model):
    from transformers import GPT2LMHeadModel

    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx) == \
        (4, 192, 6, 32, 768, 50257, 512)
    assert cfg.act_fn == "gelu_new" and cfg.normalization_type == "LNPre"        # LayerNorm, folded
    assert cfg.positional_embedding_type == "standard" and cfg.original_architecture == "GPT2LMHeadModel"
    assert model.tokenizer.bos_token_id == 50256 and model.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]
    # the processed HookedTransformer computes what the Hugging Face checkpoint computes: LayerNorm
    # folded and weights centred reorder fp32 sums: up to ~1e-4 relative on log-probabilities down to
    # -36 (1.1e-3 absolute at the tail on one CPU, under 1e-3 on another: the kernels' order differs)
    hf = GPT2LMHeadModel.from_pretrained(str(tlm.textlm.BUNDLED_DIR), dtype=torch.float32,
                                         local_files_only=True).eval()      # the shipped folder; no hub
    rows = tlm.textlm.tokens("heldout", 4 * 64, 64)
    with torch.no_grad():
        ours, theirs = model(rows).log_softmax(-1), hf(rows).logits.log_softmax(-1)
    diff = (ours - theirs).abs()
    assert (diff / theirs.abs().clamp_min(1)).max() < 3e-4 and diff.mean() < 1e-4


def test_held_out_loss(model):
    """NetworkX's source, which the model never saw: 2.51 nats per token at 128 tokens of context
    (measured on these 2,048 tokens; `tlm.textlm.info()` logs 2.27 at 512 during training)."""
    rows = tlm.textlm.tokens("heldout", 2048, 128)
    with torch.no_grad():
        loss = torch.cat([model(r, return_type="loss", loss_per_token=True) for r in rows.split(16)]).mean()
    assert loss.item() == pytest.approx(LOSS, abs=0.01)


def test_an_induction_head_by_transformer_lens_head_detector(model):
    """Repeated sequences of tokens the model has seen (20+ times in the shipped training sample):
    L3.H4 puts 0.69 of its non-BOS attention on the token after the previous occurrence."""
    from transformer_lens.head_detector import detect_head

    counts = np.bincount(tlm.textlm.token_stream("train"), minlength=50257)
    pool = np.flatnonzero(counts >= 20)
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(8):
        half = model.tokenizer.decode(rng.choice(pool, 40, replace=False).tolist())
        seqs.append(half + half)
    scores = detect_head(model, seqs, "induction_head", exclude_bos=True)
    assert scores.max() >= 0.5 and scores[3, 4] == scores.max()
    assert (scores >= 0.5).sum() == 1                              # one clear induction head


def test_gpt2_prompt_sets_report_what_is_true(model):
    """At this size, on code and documentation: docstring and induction work (a clear logit
    difference that the corrupted prompts remove), IOI does not (the model prefers the subject)."""
    results = {}
    with torch.no_grad():
        for name in ("ioi", "docstring", "induction"):
            task = getattr(tlm.tasks, name)(model.tokenizer, 16, seed=0)
            results[name] = (float(task.metric(model(task.clean))), float(task.metric(model(task.corrupted))))
    assert results["docstring"][0] > 0.5 and results["docstring"][1] < 0
    assert results["induction"][0] > 2.0 and results["induction"][1] < 0
    assert results["ioi"][0] < 0.5


def test_shipped_text_rows():
    rows = tlm.textlm.tokens("train", 1024, 128)
    assert rows.shape == (8, 128) and (rows[:, 0] == tlm.textlm.EOT).all() and rows.dtype == torch.long
    stream = tlm.textlm.token_stream("train")
    assert rows[:, 1:].reshape(-1).tolist() == stream[: 8 * 127].tolist()
    assert len(stream) == 262144 and int(stream.max()) < 50257
    with pytest.raises(ValueError, match="seq_len"):
        tlm.textlm.tokens("train", 1024, 1024)
    with pytest.raises(ValueError, match="shipped sample"):
        tlm.textlm.tokens("heldout", 10**7, 128)
    with pytest.raises(ValueError, match="split"):
        tlm.textlm.tokens("test")


def test_training_facts_are_recorded():
    info = tlm.textlm.info()
    assert [s["steps"] for s in info["stages"]] == [8180, 3741] and info["tokens"] == 390627328
    assert info["corpus"]["packages"]["python3-networkx"]["split"] == "heldout"
    assert info["stages"][-1]["log"][-1]["heldout_loss"] < 2.3


def test_fisher_compression_beats_output_pca_at_equal_dimensions_on_held_out_text(model):
    """Issue 21's check on a trained model: at a third of the read and of the write dimensions the
    Fisher bases keep the held-out predictions far closer to the clean model's than the default
    (PCA of each channel's output, whitened reads) given the same budgets."""
    fit = tlm.textlm.tokens("train", 2048, 128)
    held = tlm.textlm.tokens("heldout", 1024, 128)
    fisher = tlm.compress(model, fit, read="fisher", progress=False)
    assert {s.statistic for s in fisher.sides().values()} == {"fisher"}
    pca = tlm.compress(model, fit, progress=False)
    budget = {role: sum(s.max_rank for (_, k), s in fisher.sides().items() if (k == "write") == (role == "write")) // 3
              for role in ("read", "write")}
    kl = {name: c.truncated(budget=budget).fidelity(model, held)["kl"] for name, c in
          (("fisher", fisher), ("pca", pca))}
    # measured 1.24 against 3.53 nats (benchmarks/compression_text.py has the whole curve)
    assert kl["fisher"] < 0.6 * kl["pca"], kl
