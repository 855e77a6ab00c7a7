"""tlm.sae: sae-lens SAEs on the channels' hooks, polysemanticity against planted ground truth."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tl_modular as tlm
from tl_modular import sae as S
from tl_modular._models import count_hooks
from tl_modular.testing import tiny_model


def _standard_sae(d_in: int, d_sae: int, hook: str, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook
    torch.manual_seed(seed)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.b_enc.fill_(-0.05)
    return sae


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", seed=0)


# --- ground truth: Toy Models of Superposition -----------------------------------------------

def _tms_sae(m, d_hidden: int):
    def stream(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield m.hidden(m.sample(1024, g))
    cfg = S.SAETrainConfig(d_sae=24, l1_coefficient=0.1, lr=3e-3, n_tokens=1024 * 4000, batch_size=1024)
    return S.train_on_activations(stream(1), d_hidden, cfg, metadata={"hook_name": "hidden"})


def test_superposition_ground_truth():
    """An SAE on a superposed ReLU layer recovers the true features and scores its units as
    polysemantic; the monosemantic control (checked against its known features) scores ~1."""
    torch.set_num_threads(1)
    poly = tlm.toy.train_superposition(12, 5, steps=6000, seed=0)
    mono = tlm.toy.train_superposition(12, 12, monosemantic=True, steps=6000, seed=0)
    results = {}
    for name, m, d in (("poly", poly, 5), ("mono", mono, 12)):
        sae = _tms_sae(m, d)
        dirs, represented = m.feature_directions()
        dec = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
        max_cos = (dirs[represented] @ dec.T).max(1).values
        acts = m.hidden(m.sample(20_000, torch.Generator().manual_seed(2)))
        scores = S.polysemanticity(sae, acts, torch.eye(d)).scores
        alive = acts.max(0).values > 0
        results[name] = (max_cos, torch.as_tensor(scores)[alive], m.unit_features()[alive])
    cos, scores, known = results["poly"]
    assert cos.mean() >= 0.95, cos
    assert int(cos.numel()) >= 6                       # the model packs >= 6 features into 5 units
    assert scores.mean() >= 2.0 and scores.min() >= 1.5, scores
    assert known.min() >= 2.0                          # the units really are shared (known weights)
    cos, scores, known = results["mono"]
    assert cos.mean() >= 0.95
    # the control is monosemantic by its weights; its training rounds differently on different CPUs'
    # kernels (<= 1.3 in earlier CI runs, 1.31 on this machine), far from the superposed model's >= 2
    assert known.max() <= 1.4, known
    assert scores.max() <= 1.4, scores


def test_polysemanticity_counts_planted_features():
    """Closed case: unit 0 reads features 0 and 1 equally (2 effective), unit 1 only feature 2."""
    sae = _standard_sae(4, 3, "hidden")
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(3, 4))
        sae.W_enc.copy_(torch.eye(4, 3))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    g = torch.Generator().manual_seed(0)
    z = torch.rand(4000, 3, generator=g) * (torch.rand(4000, 3, generator=g) < 0.3)
    acts = torch.cat([z, torch.zeros(4000, 1)], 1)
    readers = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    res = S.polysemanticity(sae, acts, readers, top=1.0)
    assert res.scores[0] == pytest.approx(2.0, abs=0.05)
    assert res.scores[1] == pytest.approx(1.0, abs=1e-6)
    assert {f for f, _ in res.top_features[0]} == {0, 1}
    spread = S.feature_spread(sae, readers)
    assert spread[:3] == pytest.approx([1.0, 1.0, 1.0])
    readers2 = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert S.feature_spread(sae, readers2)[0] == pytest.approx(2.0)


def test_duplicate_features_count_once():
    sae = _standard_sae(2, 3, "hidden")
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        sae.W_enc.copy_(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    acts = torch.rand(500, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 0.0])
    assert S.polysemanticity(sae, acts, torch.eye(2), top=1.0).scores[0] == pytest.approx(1.0)
    assert S.polysemanticity(sae, acts, torch.eye(2), top=1.0, merge=None).scores[0] == pytest.approx(2.0)


def test_polysemanticity_rejects_bad_input():
    sae = _standard_sae(4, 8, "hidden")
    with pytest.raises(ValueError, match="must agree"):
        S.polysemanticity(sae, torch.randn(10, 5), torch.randn(5, 2))
    with pytest.raises(ValueError, match="NaN"):
        S.polysemanticity(sae, torch.full((10, 4), float("nan")), torch.randn(4, 2))
    with pytest.raises(ValueError, match="no activations"):
        S.polysemanticity(sae, torch.zeros(0, 4), torch.randn(4, 2))


# --- attaching to a model --------------------------------------------------------------------

def test_check_fits_names_the_problem(model):
    d = model.cfg.d_model
    assert S.check_fits(_standard_sae(d, 16, "blocks.0.hook_resid_pre"), model) == "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="d_in=7"):
        S.check_fits(_standard_sae(7, 16, "blocks.0.hook_resid_pre"), model)
    with pytest.raises(ValueError, match="no hook point"):
        S.check_fits(_standard_sae(d, 16, "blocks.9.hook_resid_pre"), model)
    sae = _standard_sae(d, 16, "blocks.0.hook_resid_pre")
    sae.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="hook_name"):
        S.check_fits(sae, model)
    z = _standard_sae(model.cfg.n_heads * model.cfg.d_head, 16, "blocks.0.attn.hook_z")
    assert S.check_fits(z, model) == "blocks.0.attn.hook_z"
    assert count_hooks(model) == 0


def test_spliced_with_error_term_is_exact_and_leaves_no_hooks(model, tokens):
    sae = _standard_sae(model.cfg.d_model, 32, "blocks.1.hook_resid_pre")
    clean = model(tokens)
    with S.spliced(model, sae, use_error_term=True):
        same = model(tokens)
    with S.spliced(model, sae):
        recon = model(tokens)
    torch.testing.assert_close(same, clean, atol=1e-5, rtol=1e-5)
    assert (recon - clean).abs().max() > 1e-3
    # editing features: zeroing every feature leaves b_dec + error
    with S.spliced(model, sae, use_error_term=True, edit=lambda hook, z: torch.zeros_like(z)):
        edited = model(tokens)
    assert (edited - clean).abs().max() > 1e-4
    assert count_hooks(model) == 0
    with pytest.raises(RuntimeError), S.spliced(model, sae):
        raise RuntimeError("boom")
    assert count_hooks(model) == 0


def test_quality_matches_a_direct_computation(model, tokens):
    sae = _standard_sae(model.cfg.d_model, 32, "blocks.1.hook_resid_pre")
    q = S.quality(model, sae, tokens)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
    x = cache["blocks.1.hook_resid_pre"][:, 1:].reshape(-1, model.cfg.d_model)
    z = sae.encode(x)
    fvu = ((sae.decode(z) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert q["fvu"] == pytest.approx(float(fvu.detach()), rel=1e-4)
    assert q["l0"] == pytest.approx(float((z != 0).float().sum(1).mean()), rel=1e-6)
    assert q["n_tokens"] == x.shape[0]
    assert 0 <= q["dead_fraction"] <= 1
    clean = float(model(tokens, return_type="loss"))
    assert q["ce_loss_clean"] == pytest.approx(clean, rel=1e-5)
    # a perfect "SAE" (identity) recovers all of the loss
    ident = _standard_sae(model.cfg.d_model, model.cfg.d_model, "blocks.1.hook_resid_pre")
    with torch.no_grad():
        ident.W_enc.copy_(torch.eye(model.cfg.d_model))
        ident.W_dec.copy_(torch.eye(model.cfg.d_model))
        ident.b_enc.fill_(100.0)   # keeps every unit in ReLU's linear range
        ident.b_dec.zero_()
        ident.W_dec.data -= 0
    # ReLU(x + 100) - 100 ... compensate with b_dec
    with torch.no_grad():
        ident.b_dec.fill_(-100.0)
        ident.cfg.apply_b_dec_to_input = False
    q = S.quality(model, ident, tokens)
    assert q["fvu"] < 1e-8 and q["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_train_sae_on_a_model_and_reload(model, tmp_path):
    tokens = torch.randint(0, 50, (64, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[::3, 8:] = 0
    cfg = S.SAETrainConfig(d_sae=64, n_tokens=20_000, batch_size=256, buffer_tokens=2048, l1_coefficient=1.0, lr=3e-3)
    sae = S.train_sae(model, tokens, "blocks.0.hook_resid_mid", cfg, attention_mask=mask, output_path=tmp_path / "s")
    assert S.hook_name(sae) == "blocks.0.hook_resid_mid"
    q = S.quality(model, sae, tokens, attention_mask=mask)
    assert q["fvu"] < 0.6 and q["l0"] < 64, q          # it learned something in 78 steps
    again = S.load(tmp_path / "s", model=model)
    torch.testing.assert_close(again.W_dec, sae.W_dec)
    cfg_json = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg_json["metadata"]["hook_name"] == "blocks.0.hook_resid_mid"
    saes = S.SAESet([sae], model)
    saes.save(tmp_path / "set")
    assert list(S.SAESet.load(tmp_path / "set", model)) == ["blocks.0.hook_resid_mid"]
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        S.load(tmp_path)
    with pytest.raises(ValueError, match="must be positive"):
        S.SAETrainConfig(n_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        S.train_sae(model, tokens[:0], "blocks.0.hook_resid_mid", cfg)


def test_release_name_loads_from_a_local_hub_cache(hf_home, gpt2_small):
    """``load(release, id)`` goes through sae-lens' pretrained directory and the hub cache."""
    from huggingface_hub import constants

    sae = _standard_sae(768, 32, "blocks.0.hook_resid_pre")
    repo = constants.HF_HUB_CACHE + "/models--jbloom--GPT2-Small-SAEs-Reformatted"
    rev = "1" * 40
    import pathlib
    snap = pathlib.Path(repo) / "snapshots" / rev / "blocks.0.hook_resid_pre"
    sae.save_model(snap)
    (pathlib.Path(repo) / "refs").mkdir(parents=True, exist_ok=True)
    (pathlib.Path(repo) / "refs" / "main").write_text(rev)
    loaded = S.load("gpt2-small-res-jb", "blocks.0.hook_resid_pre", model=gpt2_small)
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)
    with pytest.raises(ValueError, match="Valid IDs"):
        S.load("gpt2-small-res-jb", "blocks.99.hook_resid_pre")


# --- readers, unfolding, expansion -----------------------------------------------------------

def test_neuron_readers_reproduce_pre_activations(model, tokens):
    """Through the residual hook and 1/σ, the readers give each neuron's pre-activation − b_in."""
    readers = S.neuron_readers(model, 0, "blocks.0.hook_resid_mid")
    assert readers.scale_hook == "blocks.0.ln2.hook_scale"
    _, cache = model.run_with_cache(tokens)
    x = cache["blocks.0.hook_resid_mid"]
    pre = (x @ readers.vectors) / cache["blocks.0.ln2.hook_scale"]
    expect = cache["blocks.0.mlp.hook_pre"] - model.blocks[0].mlp.b_in
    if model.blocks[0].ln2.b is not None:
        expect = expect - model.blocks[0].ln2.b @ model.blocks[0].mlp.W_in
    torch.testing.assert_close(pre, expect, atol=1e-4, rtol=1e-4)


def test_unfold_and_expand_on_a_planted_sae(model, tokens):
    """An 'SAE' whose features are the write basis of L0.MLP explains its write subspace fully."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 50, (48, 10), generator=gen)
    comp = tlm.compress(model, data, rank=4)
    basis = comp["L0.MLP"].write.basis                 # [d_model, 4] orthonormal
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=model.cfg.d_model, d_sae=8, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "blocks.0.hook_mlp_out"
    sae = StandardSAE(cfg)
    with torch.no_grad():  # ± each basis direction: a ReLU SAE that is exact on the subspace
        sae.W_enc.copy_(torch.cat([basis, -basis], 1))
        sae.W_dec.copy_(torch.cat([basis, -basis], 1).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    u = S.unfold(model, comp, "L0.MLP", sae, data)
    assert u.side == "write" and u.rank == 4
    assert u.error == pytest.approx(0.0, abs=1e-4)
    assert u.explained[-1] == pytest.approx(1.0, abs=1e-4)
    assert u.weights.sum() + u.error_weight == pytest.approx(1.0, abs=1e-6)
    assert all(b >= a - 1e-6 for a, b in zip(u.explained, u.explained[1:], strict=False))    # monotone
    graph = tlm.build_graph(comp, model=model)
    g = S.expand(graph, u, n_features=3)
    feats = [n for n, d in g.nodes(data=True) if d["kind"] in ("feature", "feature_error")]
    assert len(feats) == 4 and "L0.MLP#error" in feats
    before = {v: d["static"] for _, v, d in graph.nx.out_edges("L0.MLP", data=True) if d["kind"] == "route"}
    after: dict[str, float] = {}
    for f in feats:
        for _, v, d in g.out_edges(f, data=True):
            after[v] = after.get(v, 0.0) + d["static"]
    assert after.keys() == before.keys()
    for v in before:                                    # strengths are split, not created
        assert math.isclose(after[v], before[v], rel_tol=1e-6)
    read = S.unfold(model, comp, "L1.MLP", _standard_sae(model.cfg.d_model, 16, "blocks.1.hook_resid_mid"), data)
    assert read.side == "read" and 0 <= read.error <= 1
    with pytest.raises(ValueError, match="does not see"):
        S.unfold(model, comp, "L1.MLP", sae, data, side="write")


def test_transcoder_trains_splices_and_unfolds(model, tmp_path):
    tokens = torch.randint(0, 50, (64, 12), generator=torch.Generator().manual_seed(2))
    cfg = S.SAETrainConfig(d_sae=64, n_tokens=20_000, batch_size=256, buffer_tokens=2048, l1_coefficient=0.3, lr=3e-3)
    tc = S.train_transcoder(model, tokens, 0, cfg, output_path=tmp_path / "tc")
    assert tc.cfg.metadata.hook_name == "blocks.0.ln2.hook_normalized"
    assert tc.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out"
    again = S.load(tmp_path / "tc", model=model)
    torch.testing.assert_close(again.W_enc, tc.W_enc)
    q = S.quality(model, again, tokens)
    assert q["fvu"] < 0.9, q                            # it predicts the MLP's output, roughly
    # fvu agrees with a direct computation on the output hook
    _, cache = model.run_with_cache(tokens)
    x = cache["blocks.0.ln2.hook_normalized"][:, 1:].reshape(-1, model.cfg.d_model)
    y = cache["blocks.0.hook_mlp_out"][:, 1:].reshape(-1, model.cfg.d_model)
    pred = again.decode(again.encode(x))
    assert q["fvu"] == pytest.approx(float((((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()).detach()),
                                     rel=1e-4)
    clean = model(tokens)
    with S.spliced(model, again, use_error_term=True):
        torch.testing.assert_close(model(tokens), clean, atol=1e-5, rtol=1e-5)
    assert count_hooks(model) == 0
    comp = tlm.compress(model, tokens, rank=4)
    u = S.unfold(model, comp, "L0.MLP", again, tokens)
    assert u.side == "write" and 0 <= u.error <= 1
    with pytest.raises(ValueError, match="what its MLP writes"):
        S.unfold(model, comp, "L0.MLP", again, tokens, side="read")
    bad = S.load(tmp_path / "tc")
    bad.cfg.metadata.hook_name_out = "blocks.0.mlp.hook_post"        # d_mlp wide, not d_model
    with pytest.raises(ValueError, match="d_out="):
        S.check_fits(bad, model)
