"""Tests of tl_modular.training: the modularity loss and training with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tl_modular.testing import planted_modules, tiny_model
from tl_modular.training import ModularityLoss, alignment_matrix, graph_modularity, train_modular, unit_names
from tl_modular.training.modularity import _params, _spec


@pytest.fixture(scope="module")
def planted():
    return planted_modules()


def test_zero_on_planted_modules_with_true_and_spectral_assignment(planted):
    model, module_of, _ = planted
    loss = ModularityLoss(n_modules=3)
    loss.assign(model, module_of)
    assert float(loss(model).detach()) == pytest.approx(0.0, abs=1e-12)
    # spectral clustering recovers the planted modules from the weights alone
    found = ModularityLoss(n_modules=3)
    assert float(found(model).detach()) == pytest.approx(0.0, abs=1e-12)
    truth = {frozenset(n for n, m in module_of.items() if m == k) for k in range(3)}
    assert set(found.modules()) == truth
    neuron = ModularityLoss(n_modules=3, level="neuron", soft=True)
    assert float(neuron(model).detach()) == pytest.approx(0.0, abs=1e-6)  # soft memberships: exp(-d²/T) tails


def test_positive_with_leak_wrong_modules_or_no_structure(planted):
    model, module_of, _ = planted
    leaky, leaky_of, _ = planted_modules(leak=0.3)
    loss = ModularityLoss(n_modules=3)
    loss.assign(leaky, leaky_of)
    assert 0.05 < float(loss(leaky).detach()) < 0.5
    shuffled = {name: (m + (name.endswith("MLP"))) % 3 for name, m in module_of.items()}
    loss.assign(model, shuffled)
    assert float(loss(model).detach()) > 0.05
    dense, _, _ = planted_modules(structured=False)
    assert float(ModularityLoss(n_modules=3)(dense)) > 0.3


def test_alignment_is_a_share_in_unit_interval_and_respects_order():
    model = tiny_model("gpt2", seed=1)
    a = alignment_matrix(_params(model), _spec(model))
    names = unit_names(model)
    assert a.shape == (len(names), len(names)) and bool((a >= 0).all())
    # writer layer 1 never feeds reader layer 0; a head feeds its own layer's MLP (not parallel)
    i, j = names.index("L1.H0"), names.index("L0.MLP")
    assert float(a[i, j]) == 0.0 and float(a[names.index("L0.H0"), j]) > 0
    # each writer's alignment with one reader is at most 1 (both maps have unit Frobenius norm)
    assert float(a.max()) <= 1.0
    neuron = alignment_matrix(_params(model), _spec(model), "neuron")
    assert float(neuron.sum()) == pytest.approx(float(a.sum()), rel=1e-5)  # neurons sum to their MLP


def test_gradcheck_float64(one_thread):
    model = tiny_model("gpt2", seed=2, dtype=torch.float64, d_model=4, d_mlp=4, d_head=2, n_heads=2)
    spec = _spec(model)
    params = {k: v.detach().clone() for k, v in _params(model).items()}
    keys = sorted(params)
    loss = ModularityLoss(n_modules=2, refresh_every=0)
    loss.refresh(model)

    def f(*tensors):
        return loss.penalty(alignment_matrix(dict(zip(keys, tensors, strict=True)), spec))

    inputs = tuple(params[k].requires_grad_(True) for k in keys)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
    soft = ModularityLoss(n_modules=2, level="neuron", soft=True, sparsity=0.5, refresh_every=0)
    soft.refresh(model)
    g = lambda *t: soft.penalty(alignment_matrix(dict(zip(keys, t, strict=True)), spec, "neuron"))  # noqa: E731
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def _value(model, loss):
    return float(loss.penalty(alignment_matrix({k: v.detach() for k, v in _params(model).items()}, _spec(model),
                                               loss.config.level)))


@pytest.mark.parametrize("level", ["channel", "neuron"])
def test_invariances(level):
    model = tiny_model("no_norm", seed=3, dtype=torch.float64)  # ReLU, so W_in·c / W_out/c preserves function
    loss = ModularityLoss(n_modules=2, level=level, soft=True, sparsity=0.3, refresh_every=0)
    loss.refresh(model)
    base = _value(model, loss)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():  # a global rescaling of every weight
            p.mul_(3.7)
    assert _value(model, loss) == pytest.approx(base, rel=1e-10)
    with torch.no_grad():
        for p in model.parameters():
            p.div_(3.7)
        for block in model.blocks:
            c = torch.rand(model.cfg.n_heads, generator=gen, dtype=torch.float64) * 4 + 0.2
            block.attn.W_V.mul_(c[:, None, None])
            block.attn.b_V.mul_(c[:, None])
            block.attn.W_O.div_(c[:, None, None])
            q = torch.rand(model.cfg.n_heads, generator=gen, dtype=torch.float64) * 4 + 0.2
            block.attn.W_Q.mul_(q[:, None, None])
            block.attn.b_Q.mul_(q[:, None])
            block.attn.W_K.div_(q[:, None, None])
            block.attn.b_K.div_(q[:, None])
            k = torch.rand(model.cfg.d_mlp, generator=gen, dtype=torch.float64) * 4 + 0.2  # per neuron, > 0
            block.mlp.W_in.mul_(k[None, :])
            block.mlp.b_in.mul_(k)
            block.mlp.W_out.div_(k[:, None])
    torch.testing.assert_close(model(tokens), logits, rtol=1e-9, atol=1e-9)  # the function is unchanged
    assert _value(model, loss) == pytest.approx(base, rel=1e-9)


def test_layernorm_gain_is_folded():
    """Scaling an LN gain coordinate and the reads it feeds by the inverse leaves the loss alone."""
    model = tiny_model("gpt2", seed=5, dtype=torch.float64)
    loss = ModularityLoss(n_modules=2, refresh_every=0)
    loss.refresh(model)
    base = _value(model, loss)
    with torch.no_grad():
        s = torch.linspace(0.3, 3.0, model.cfg.d_model, dtype=torch.float64)
        blk = model.blocks[1]
        blk.ln1.w.mul_(s)
        for w in (blk.attn.W_Q, blk.attn.W_K, blk.attn.W_V):
            w.div_(s[None, :, None])
    assert _value(model, loss) == pytest.approx(base, rel=1e-9)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="n_modules"):
        ModularityLoss(n_modules=1)
    with pytest.raises(ValueError, match="level"):
        ModularityLoss(level="layer")
    with pytest.raises(RuntimeError, match="refresh"):
        ModularityLoss().modules()
    with pytest.raises(ValueError, match="weight"):
        train_modular(None, None, -1.0, 1)


def test_training_raises_modularity_on_a_small_model(tmp_path, one_thread):
    torch.manual_seed(0)
    model = tiny_model("gpt2", seed=6, d_vocab=64)
    data = [_tokens_task(model)]
    loss = ModularityLoss(n_modules=2, refresh_every=20)
    result = train_modular(model, data, 3.0, 60, loss=loss, eval_every=20, lr=1e-2, warmup=5,
                           checkpoint_dir=tmp_path, progress=False)
    before, after = result.initial["cross_fraction"], result.history[-1]["cross_fraction"]
    assert after < 0.5 * before
    assert {"modularity_loss", "cross_fraction", "modules", "accuracy"} <= set(result.history[-1])
    assert (tmp_path / "train_state.safetensors").exists()
    # resuming a finished run does nothing and keeps the history
    again = train_modular(model, data, 3.0, 60, loss=loss, eval_every=20, lr=1e-2, warmup=5,
                          checkpoint_dir=tmp_path, progress=False)
    assert again.step == 60 and len(again.history) == len(result.history)
    # the graph's z-scores: its own modules, and the loss's modules as a fixed partition
    g = graph_modularity(model, data[0].clean[:32], n_null=10, modules=loss.modules())
    assert {"z", "Q", "z_modules", "Q_modules"} <= set(g) and np.isfinite(g["Q_modules"])
    assert ModularityLoss().config.n_modules == 4          # the default train_modular uses


def _tokens_task(model):
    """A copy task on random tokens (any learnable objective will do for the modularity test)."""
    from tl_modular.tasks.task import Task

    gen = torch.Generator().manual_seed(0)
    half = torch.randint(1, model.cfg.d_vocab, (256, 5), generator=gen)
    clean = torch.cat([half, half], 1)
    positions = torch.arange(5, 9).expand(256, 4)
    corrupted = torch.randint(1, model.cfg.d_vocab, clean.shape, generator=gen)
    return Task(name="copy", clean=clean, corrupted=corrupted, answers=clean[:, 6:10], positions=positions,
                metric_kind="accuracy")
