"""Fisher moments against the exact Fisher (torch.func Jacobians), and compression/refinement built on them."""

from __future__ import annotations

import pytest
import torch

from tl_modular._models import count_hooks, fingerprint
from tl_modular.compression import compress
from tl_modular.compression.fisher import collect_fisher
from tl_modular.testing import tiny_model


def _exact_fisher(model, tokens, hook, select):
    """Σ_t' Jᵀ (diag p − p pᵀ) J for every input position t ≥ 1, averaged: J = ∂logits_t'/∂a_t, with
    ``a`` the slice ``select`` of activation ``hook`` (the true Fisher of the model's predictions)."""
    total, count = 0.0, 0
    for row in tokens:
        row = row[None]
        _, cache = model.run_with_cache(row, names_filter=hook)
        base = cache[hook]
        for t in range(1, row.shape[1]):
            def logits(delta, t=t, row=row):
                def add(act, hook):
                    act = act.clone()
                    act[(0, t, *select)] += delta
                    return act
                return model.run_with_hooks(row, fwd_hooks=[(hook, add)])[0, :-1]
            delta = torch.zeros(base[(0, t, *select)].shape, dtype=base.dtype)
            jac = torch.func.jacrev(logits)(delta)                          # [pos-1, vocab, d]
            p = logits(delta).softmax(-1)
            cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]       # [pos-1, vocab, vocab]
            total = total + torch.einsum("tvi,tvw,twj->ij", jac, cov, jac)
            count += 1
    return total / count


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", seed=3, dtype=torch.float64)


def test_sampled_fisher_is_the_exact_fisher(model):
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    before = fingerprint(model)
    repeats = tokens.repeat(1500, 1)             # 1,500 label samples per position
    fisher = collect_fisher(model, repeats, batch_size=500, progress=False)
    assert count_hooks(model) == 0 and fingerprint(model) == before and all(p.grad is None for p in model.parameters())
    for hook, estimate in [("blocks.0.hook_mlp_out", fisher.writes["blocks.0.hook_mlp_out"]),
                           ("blocks.1.hook_attn_out", fisher.writes["blocks.1.hook_attn_out"])]:
        exact = _exact_fisher(model, tokens, hook, ())
        # Monte Carlo: 15,000 outer products of 16-vectors, about 3% in Frobenius norm
        assert (estimate - exact).norm() / exact.norm() < 0.1, hook
    exact_v = _exact_fisher(model, tokens, "blocks.0.attn.hook_v", (2,))          # head 2's value
    assert (fisher.ports[("L0.H2", "v")] - exact_v).norm() / exact_v.norm() < 0.1


@pytest.mark.parametrize("kind", ["gpt2", "gated_rms"])
def test_full_rank_fisher_compression_reproduces_the_model(kind):
    model = tiny_model(kind, seed=1)
    tokens = torch.randint(0, 50, (24, 10), generator=torch.Generator().manual_seed(0))
    comp = compress(model, tokens, read="fisher", write="fisher", rank=10_000, progress=False)
    clean = model(tokens)
    with comp.applied(model):
        restricted = model(tokens)
    # directions outside a Fisher side change nothing the logits see (e.g. the residual's mean,
    # which every LayerNorm removes); fp32 sums re-associated as in the other statistics' test
    torch.testing.assert_close(restricted, clean, atol=5e-5, rtol=0)


def test_fisher_budget_follows_marginal_kl_and_refinement_lowers_kl(model):
    tokens = torch.randint(0, 50, (64, 12), generator=torch.Generator().manual_seed(1))
    held = torch.randint(0, 50, (32, 12), generator=torch.Generator().manual_seed(2))
    comp = compress(model, tokens, read="fisher", write="fisher", progress=False)
    budget = {"read": 40, "write": 12}
    small = comp.truncated(budget=budget)
    ranks = {k: s.rank for k, s in small.sides().items()}
    assert sum(r for (_, k), r in ranks.items() if k == "write") == 12
    assert sum(r for (_, k), r in ranks.items() if k != "write") == 40
    # the marginal-KL allocation: among the write sides, every kept direction is worth at least as
    # much as every dropped one (absolute spectra, one unit across channels)
    writes = [s for (_, k), s in small.sides().items() if k == "write"]
    kept = min(float(s.spectrum[s.rank - 1]) for s in writes if s.rank)
    dropped = max(float(s.spectrum[s.rank]) for s in writes if s.rank < s.max_rank)
    assert kept >= dropped
    kl_fisher = small.fidelity(model, held)["kl"]
    before = fingerprint(model)
    refined = small.refined(model, tokens, steps=40, lr=3e-2, batch_size=16, positions=1.0, progress=False)
    assert fingerprint(model) == before and count_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert {k: s.rank for k, s in refined.sides().items()} == ranks
    assert refined.fidelity(model, held)["kl"] < 0.8 * kl_fisher
    assert refined.config["refined"]["kl_last"] < refined.config["refined"]["kl_first"]
    assert any(s.statistic == "fisher+refined" for s in refined.sides().values())
