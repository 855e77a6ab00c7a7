"""Channel statistics: closed forms against brute-force torch.func Jacobians, masks and errors."""

from __future__ import annotations

import pytest
import torch

import tl_modular as tlm
from tl_modular._models import count_hooks
from tl_modular.compression.statistics import collect_statistics
from tl_modular.testing import tiny_model

KINDS = ["gpt2", "ln_pre", "no_norm", "rms_pre", "rotary", "gated_rms", "parallel", "shortformer", "alibi"]


def _valid(tokens):
    w = torch.ones(tokens.shape, dtype=torch.bool)
    w[:, 0] = False
    return w


def _head_reference(model, cache, head, tokens):
    """Σ over valid inputs of Σ over valid outputs of J Jᵀ, by jacrev through the model's attention."""
    a = f"blocks.{head.layer}.attn."
    attn = model.blocks[head.layer].attn
    valid = _valid(tokens)
    grams = {p: torch.zeros(model.cfg.d_head, model.cfg.d_head, dtype=torch.float64) for p in "qkv"}
    for b in range(tokens.shape[0]):
        y = cache[head.input_hook][b:b + 1]

        def write(q, k, v, y=y, b=b):
            out = {}
            hooks = [(a + "hook_q", lambda act, hook: q), (a + "hook_k", lambda act, hook: k),
                     (a + "hook_v", lambda act, hook: v), (a + "hook_z", lambda act, hook: out.setdefault("z", act))]
            with model.hooks(fwd_hooks=hooks):
                attn(query_input=y, key_input=y, value_input=y)
            return (out["z"][0, :, head.head] @ head.weights["W_O"]) * valid[b][:, None]

        args = tuple(cache[a + f"hook_{p}"][b:b + 1] for p in "qkv")
        jac = torch.func.jacrev(write, argnums=(0, 1, 2))(*args)
        for p, J in zip("qkv", jac, strict=True):
            J = J[:, :, 0, :, head.head if p == "q" else head.kv_head, :]   # [out pos, d_model, in pos, d_head]
            for i in range(tokens.shape[1]):
                if valid[b, i]:
                    Ji = J[:, :, i].reshape(-1, J.shape[-1])
                    grams[p] += Ji.T @ Ji
    return grams


@pytest.mark.parametrize("kind", KINDS)
def test_closed_forms_equal_brute_force_jacobians_fp64(kind):
    model = tiny_model(kind, seed=2, dtype=torch.float64)
    tokens = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    stats = collect_statistics(model, tokens, progress=False)
    assert stats.method == "heads: closed_form, mlps: closed_form"
    assert stats.n_tokens == 15
    channels = tlm.segment(model)
    _, cache = model.run_with_cache(tokens)
    for head in [channels["L1.H0"], channels["L0.H3"]]:
        ref = _head_reference(model, cache, head, tokens)
        for p in "qkv":
            torch.testing.assert_close(stats.reads[head.name][p].jacobian, ref[p] / 15, rtol=1e-10, atol=1e-12)
    if "L1.MLP" not in channels:
        return
    mlp_channel = channels["L1.MLP"]
    mlp, ln = model.blocks[1].mlp, model.blocks[1].ln2
    scale, shift = getattr(ln, "w", 1.0), getattr(ln, "b", 0.0)
    ys = cache[mlp_channel.input_hook][_valid(tokens)]
    read = write = 0
    for y in ys:
        J = torch.func.jacrev(lambda x: mlp((x * scale + shift)[None, None])[0, 0])(y)  # [out, in]
        read, write = read + J.T @ J, write + J @ J.T
    torch.testing.assert_close(stats.reads["L1.MLP"]["in"].jacobian, read / 15, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.writes["L1.MLP"].jacobian, write / 15, rtol=1e-10, atol=1e-12)
    assert count_hooks(model) == 0


def test_closed_forms_in_fp32_match_fp64():
    m64 = tiny_model("gpt2", seed=3, dtype=torch.float64)
    m32 = tiny_model("gpt2", seed=3, dtype=torch.float64).to(torch.float32, print_details=False)
    tokens = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(2))
    s64, s32 = (collect_statistics(m, tokens, progress=False) for m in (m64, m32))
    for name in ["L0.H1", "L1.H2"]:
        for p in "qkv":
            a, b = s64.reads[name][p].jacobian, s32.reads[name][p].jacobian
            assert float((a - b).norm() / a.norm()) < 1e-4  # fp32 activations, fp64 accumulation
    a, b = s64.reads["L1.MLP"]["in"].jacobian, s32.reads["L1.MLP"]["in"].jacobian
    assert float((a - b).norm() / a.norm()) < 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "rotary", "gated_rms"])
def test_matrix_free_estimates_agree_with_closed_forms(kind):
    model = tiny_model(kind, seed=4, dtype=torch.float64)
    tokens = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(3))
    exact = collect_statistics(model, tokens, progress=False)
    est = collect_statistics(model, tokens, progress=False, method="matrix_free", n_probes=64, seed=1)
    assert est.method == "heads: matrix_free, mlps: matrix_free"
    # Rademacher-probe estimates over ~100 tokens x 64 probes: a few percent of relative error.
    for name in ["L0.H0", "L1.H3"]:
        for p in "qkv":
            a, b = exact.reads[name][p].jacobian, est.reads[name][p].jacobian
            assert float((a - b).norm() / a.norm()) < 0.2, (name, p)
    for a, b in [(exact.reads["L1.MLP"]["in"].jacobian, est.reads["L1.MLP"]["in"].jacobian),
                 (exact.writes["L1.MLP"].jacobian, est.writes["L1.MLP"].jacobian)]:
        assert float((a - b).norm() / a.norm()) < 0.2


def test_solu_falls_back_to_matrix_free():
    model = tiny_model("solu", seed=1)
    stats = collect_statistics(model, torch.randint(0, 50, (4, 6)), progress=False)
    assert stats.method == "heads: closed_form, mlps: matrix_free"
    assert stats.reads["L0.MLP"]["in"].jacobian.shape == (16, 16)


def test_first_position_and_padding_are_excluded():
    model = tiny_model("gpt2", seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    short = torch.randint(0, 50, (2, 5), generator=g)
    padded = torch.cat([short, torch.randint(0, 50, (2, 3), generator=g)], dim=1)
    mask = torch.zeros(padded.shape, dtype=torch.long)
    mask[:, :5] = 1
    a = collect_statistics(model, short, progress=False)
    b = collect_statistics(model, padded, attention_mask=mask, progress=False)
    assert a.n_tokens == b.n_tokens == 8
    for name in ["L0.H2", "L1.H1"]:
        for p in "qkv":
            torch.testing.assert_close(a.reads[name][p].jacobian, b.reads[name][p].jacobian)
        torch.testing.assert_close(a.writes[name].cov, b.writes[name].cov)
    for hook in a.inputs:
        torch.testing.assert_close(a.inputs[hook].cov, b.inputs[hook].cov)
    torch.testing.assert_close(a.reads["L0.MLP"]["in"].jacobian, b.reads["L0.MLP"]["in"].jacobian)


def test_batching_does_not_change_the_statistics():
    model = tiny_model("rotary", seed=6, dtype=torch.float64)
    tokens = torch.randint(0, 50, (7, 6), generator=torch.Generator().manual_seed(5))
    a = collect_statistics(model, tokens, batch_size=7, progress=False)
    b = collect_statistics(model, tokens, batch_size=2, progress=False)
    torch.testing.assert_close(a.reads["L1.H0"]["k"].jacobian, b.reads["L1.H0"]["k"].jacobian)
    torch.testing.assert_close(a.writes["L1.MLP"].cov, b.writes["L1.MLP"].cov)


@pytest.mark.parametrize("tokens, error, match", [
    (torch.zeros((0, 5), dtype=torch.long), ValueError, "at least one sequence"),
    (torch.zeros((2, 1), dtype=torch.long), ValueError, "at least one sequence"),
    (torch.zeros((1, 40), dtype=torch.long), ValueError, "n_ctx"),
    (torch.full((1, 4), 99), ValueError, "token ids"),
    (torch.zeros((1, 4)), TypeError, "integer"),
])
def test_bad_tokens_raise_clearly(tokens, error, match):
    model = tiny_model("gpt2")
    with pytest.raises(error, match=match):
        collect_statistics(model, tokens, progress=False)
    assert count_hooks(model) == 0


def test_mask_shape_and_method_are_checked():
    model = tiny_model("gpt2")
    tokens = torch.zeros((2, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        collect_statistics(model, tokens, attention_mask=torch.ones(2, 3), progress=False)
    with pytest.raises(ValueError, match="method"):
        collect_statistics(model, tokens, method="exact", progress=False)
    with pytest.raises(ValueError, match="no tokens left"):
        collect_statistics(model, tokens, attention_mask=torch.tensor([[1, 0, 0, 0]] * 2), progress=False)
