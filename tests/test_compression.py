"""Compression: exactness at full rank, planted subspaces, rank choice, files and hook hygiene."""

from __future__ import annotations

import pytest
import torch

import tl_modular as tlm
from tl_modular._models import count_hooks
from tl_modular.compression import Compression, compress
from tl_modular.compression.fidelity import rank_fidelity_curve
from tl_modular.errors import UnsupportedModelError
from tl_modular.testing import tiny_model

KINDS = ["gpt2", "ln_pre", "no_norm", "rms_pre", "rotary", "gated_rms", "parallel", "shortformer", "solu",
         "attn_only"]


def _tokens(seed=0, batch=24, pos=10):
    return torch.randint(0, 50, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind, read", [(k, "whitened") for k in KINDS]
                         + [(k, r) for k in ("gpt2", "gated_rms") for r in ("jacobian", "rrr")])
def test_full_rank_compression_reproduces_the_model(kind, read):
    model = tiny_model(kind, seed=1)
    tokens = _tokens()
    comp = compress(model, tokens, read=read, rank=10_000, progress=False)
    assert comp.total_rank == comp.max_total_rank
    clean = model(tokens)
    with comp.applied(model):
        restricted = model(tokens)
    # fp32 logits ~O(1) after two layers of re-associated sums (the projector E Dᵀ is the
    # identity on the data's support only up to rounding).
    torch.testing.assert_close(restricted, clean, atol=2e-5, rtol=0)
    assert count_hooks(model) == 0


def _planted_model():
    """No normalization; L0.MLP reads span(B) and writes span(T); L1.H0 reads span(V) (value)
    and writes span(O)."""
    model = tiny_model("no_norm", seed=0, noise=0.0)
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    B, T, V, O = Q[:, :3], Q[:, 3:5], Q[:, 5:7], Q[:, 7:9]
    with torch.no_grad():
        mlp = model.blocks[0].mlp
        mlp.W_in.copy_(B @ torch.randn(3, 32, generator=g))
        mlp.b_in.copy_(torch.randn(32, generator=g) * 0.1)
        mlp.W_out.copy_(torch.randn(32, 2, generator=g) @ T.T)
        attn = model.blocks[1].attn
        attn.W_V[0] = V @ torch.randn(2, 4, generator=g)
        attn.W_O[0] = torch.randn(4, 2, generator=g) @ O.T
    return model, {"B": B, "T": T, "V": V, "O": O}


def _cosines(a, b):
    return torch.linalg.svdvals(a.T.to(torch.float64) @ b.to(torch.float64))


def test_planted_read_and_write_subspaces_are_recovered():
    model, planted = _planted_model()
    comp = compress(model, _tokens(1, 64, 12), energy=0.999999, progress=False)
    mlp, head = comp["L0.MLP"], comp["L1.H0"]
    assert mlp.read["in"].max_rank == 3 and mlp.write.max_rank == 2
    assert torch.allclose(_cosines(mlp.read.basis, planted["B"]), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(_cosines(mlp.write.basis, planted["T"]), torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert head.read["v"].max_rank == 2 and head.write.max_rank == 2
    assert torch.allclose(_cosines(head.read["v"].basis, planted["V"]), torch.ones(2, dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(_cosines(head.write.basis, planted["O"]), torch.ones(2, dtype=torch.float64), atol=1e-6)


def test_rank_choices_and_budget():
    model = tiny_model("gpt2", seed=2)
    comp = compress(model, _tokens(2), progress=False)
    assert 0 < comp.total_rank <= comp.max_total_rank
    for budget in (0, 7, 40, comp.max_total_rank):
        assert comp.truncated(budget=budget).total_rank == budget
    low, high = comp.truncated(energy=0.5), comp.truncated(energy=0.95)
    assert low.total_rank <= high.total_rank
    assert all(s.rank == min(2, s.max_rank) for s in comp.truncated(rank=2).sides().values())
    with pytest.raises(ValueError, match="exactly one"):
        comp.truncated(energy=0.5, rank=2)
    with pytest.raises(ValueError, match="energy"):
        comp.truncated(energy=1.5)


def test_fidelity_and_curve_are_monotone_enough():
    model = tiny_model("gpt2", seed=3)
    tokens = _tokens(3, 48, 12)
    comp = compress(model, tokens, progress=False)
    full = comp.truncated(budget=comp.max_total_rank).fidelity(model, tokens)
    assert full["loss_recovered"] == pytest.approx(1.0, abs=1e-3) and full["kl"] == pytest.approx(0, abs=1e-5)
    none = comp.truncated(budget=0).fidelity(model, tokens)
    assert none["compressed_loss"] == pytest.approx(none["ablated_loss"], abs=1e-5)
    curve = rank_fidelity_curve(model, comp, tokens, [0, comp.max_total_rank // 2, comp.max_total_rank])
    assert [r["dimensions"] for r in curve] == [0, comp.max_total_rank // 2, comp.max_total_rank]
    assert curve[0]["kl"] >= curve[1]["kl"] >= curve[2]["kl"] - 1e-6


def test_oblique_sides_and_residual_bases():
    model = tiny_model("gpt2", seed=4)
    comp = compress(model, _tokens(4), progress=False)
    side = comp["L1.MLP"].read["in"]
    assert side.oblique and side.statistic == "whitened"
    eye = side.decoder.T @ side.encoder
    torch.testing.assert_close(eye, torch.eye(side.rank, dtype=eye.dtype), atol=1e-6, rtol=0)
    basis = comp["L1.MLP"].read.basis
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype), atol=1e-8, rtol=0)
    # LayerNorm ignores the all-ones direction: residual read bases are orthogonal to it.
    assert (basis.sum(0).abs() < 1e-8).all()
    head = comp["L0.H1"]
    assert set(head.read) == {"q", "k", "v"} and head.read.basis.shape[1] <= 3 * model.cfg.d_head
    assert comp["L0.H1"].write.max_rank <= model.cfg.d_head


def test_factored_maps_match_the_weights_at_full_rank():
    model = tiny_model("no_norm", seed=5)
    comp = compress(model, _tokens(5, 64, 12), read="jacobian", rank=10_000, progress=False)
    c = tlm.segment(model)["L1.H2"]
    w = c.weights
    ov = comp.factored(model, "L1.H2", "OV")
    qk = comp.factored(model, "L1.H2", "QK")
    torch.testing.assert_close(ov.AB, (w["W_V"] @ w["W_O"]).to(torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qk.AB, (w["W_Q"] @ w["W_K"].T).to(torch.float64), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a head"):
        comp.factored(model, "L1.MLP")


def test_save_load_roundtrip_and_model_check(tmp_path):
    model = tiny_model("gpt2", seed=6)
    tokens = _tokens(6)
    comp = compress(model, tokens, budget=30, progress=False)
    comp.save(tmp_path / "c")
    again = Compression.load(tmp_path / "c", model)
    assert again.total_rank == 30 and set(again.channels) == set(comp.channels)
    with comp.applied(model):
        a = model(tokens)
    with again.applied(model):
        b = model(tokens)
    torch.testing.assert_close(a, b)
    other = tiny_model("gpt2", seed=7)
    with pytest.raises(ValueError, match="another model"):
        Compression.load(tmp_path / "c", other)
    with pytest.raises(ValueError, match="another model"), comp.applied(other):
        pass


def test_applied_is_hygienic_on_errors():
    model = tiny_model("gpt2", seed=8)
    comp = compress(model, _tokens(8), budget=20, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), comp.applied(model):
        model(_tokens(9))
        raise RuntimeError("boom")
    assert count_hooks(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(KeyError, match="no compressed channel"), comp.applied(model, ["L7.MLP"]):
        pass
    assert count_hooks(model) == 0


def test_compressing_a_subset_and_bad_arguments():
    model = tiny_model("gpt2", seed=9)
    comp = compress(model, _tokens(9), channels=["L0.MLP", "L1.H1"], progress=False)
    assert list(comp) == ["L0.MLP", "L1.H1"]
    with pytest.raises(ValueError, match="only heads and MLPs"):
        compress(model, _tokens(9), channels=["embed"], progress=False)
    with pytest.raises(ValueError, match="read must be"):
        compress(model, _tokens(9), read="svd", progress=False)
    with pytest.raises(tlm.UnsupportedModelError, match="grouped-query"):
        compress(tiny_model("gqa"), _tokens(9), progress=False)


def test_compression_is_a_mapping_of_channels():
    """Compression is a read-only Mapping (like ReadSpace, CircuitSet, SAESet): channel name → record, in
    the order compressed; len, in, iteration and the KeyError message are those of before."""
    from collections.abc import Mapping

    model = tiny_model("gpt2", seed=9)
    comp = compress(model, _tokens(9), channels=["L1.H1", "L0.MLP"], rank=2, progress=False)
    assert isinstance(comp, Mapping) and len(comp) == 2 and list(comp) == list(comp.keys()) == ["L1.H1", "L0.MLP"]
    assert "L1.H1" in comp and "L1.H0" not in comp and 3 not in comp
    assert dict(comp.items()) == comp.channels and list(comp.values()) == [comp["L1.H1"], comp["L0.MLP"]]
    assert comp.get("L1.H0") is None and comp.get("L1.H1") is comp.channels["L1.H1"]
    assert comp["L1.H1"].kind == "head" and comp["L1.H1"].read["q"].rank == 2
    with pytest.raises(KeyError, match="no compressed channel 'L1.H0'"):
        comp["L1.H0"]
    assert comp == comp and comp.__hash__ is None


def test_bridge_compression_is_exact_at_full_rank(bridge, gpt2_tokenizer):
    tokens = gpt2_tokenizer(["The cat sat on the mat and looked at the dog"] * 4, return_tensors="pt")["input_ids"]
    # Fisher statistics are refused on a bridge, naming the hook whose gradient its forward does not carry
    with pytest.raises(UnsupportedModelError, match="read='whitened'"):
        compress(bridge, tokens, read="fisher", progress=False)
    assert count_hooks(bridge) == 0
    comp = compress(bridge, tokens, rank=10_000, progress=False)
    clean = bridge(tokens)
    with comp.applied(bridge):
        restricted = bridge(tokens)
    torch.testing.assert_close(restricted, clean, atol=1e-4, rtol=1e-4)
    assert count_hooks(bridge) == 0
