"""Tests of tl_modular.training.build_interpretable: label → simulate → match → freeze, layer by layer."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from tl_modular._io import read_safetensors
from tl_modular._models import count_hooks
from tl_modular.testing import tiny_model
from tl_modular.training import BuildConfig, build_interpretable, lm_task
from tl_modular.training.matching import _Match, _pearson
from tl_modular.training.targets import _grid, _Targets

# A run that matches hard: few steps, a large match weight and a high learning rate on a tiny model.
SETTINGS = dict(steps_per_layer=80, match_weight=20.0, keep_free=4, n_contexts=32, n_heldout=16, match_batch=16,
                lr=3e-3, warmup=2, eval_every=20, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randint(0, 50, (64, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def built(one_thread, data, tmp_path_factory):
    model = tiny_model("gpt2", seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("build")
    result = build_interpretable(model, data, checkpoint_dir=root, progress=False, **SETTINGS)
    return model, before, result, root


def test_labels_get_better_on_every_constrained_layer(built):
    _, _, result, _ = built
    assert [r.layer for r in result.layers] == [0, 1]
    for r in result.layers:
        # the ground truth: the neurons move toward what their fixed labels predict ...
        assert r.match_loss["after"] < 0.6 * r.match_loss["before"]
        assert r.fidelity["train_after"] > r.fidelity["train_before"] + 0.05
        assert r.fidelity["heldout_after"] > r.fidelity["heldout_before"]
        # ... so the re-labeled neurons score at least as well on held-out contexts
        assert r.scores["after"]["mean"] >= r.scores["before"]["mean"]
        assert r.scores["after"]["n"] == len(r.constrained) == 32 - 4
        assert math.isfinite(r.loss["before"]) and math.isfinite(r.loss["after"])
        assert set(r.accuracy["before"]) == {"lm"}
    assert "| 0 | 28 |" in result.to_markdown()


def test_frozen_layers_stay_bit_identical_while_later_layers_train(built):
    _, _, result, root = built
    phase0, _ = read_safetensors(root / "L0" / "train_state.safetensors")   # the model when layer 0 froze
    end0 = {k[len("model."):]: v for k, v in phase0.items() if k.startswith("model.")}
    final = result.model.state_dict()
    frozen0 = result[0].frozen
    assert "embed.W_E" in frozen0 and "blocks.0.attn.W_Q" in frozen0 and "blocks.0.mlp.W_out" in frozen0
    assert not any(n.startswith(("blocks.1.", "unembed", "ln_final")) for n in frozen0)
    for name in frozen0:
        assert torch.equal(final[name], end0[name]), name
    assert not torch.equal(final["blocks.1.mlp.W_in"], end0["blocks.1.mlp.W_in"])   # layer 1 did train
    params = dict(result.model.named_parameters())
    assert all(not params[n].requires_grad for n in result[1].frozen)
    assert params["unembed.W_U"].requires_grad


def test_keep_free_neurons_are_the_worst_labeled_and_get_no_match_gradient(built, data):
    model, _, result, root = built
    r = result[0]
    assert len(r.free) == 4 and set(r.free).isdisjoint(r.constrained)
    assert sorted(r.free + r.constrained) == list(range(32))
    scores = {lab.unit: lab.score for lab in r.labels_before}
    worst = max(scores[f"L0.MLP.N{i}"] if scores[f"L0.MLP.N{i}"] is not None else -np.inf for i in r.free)
    best_free_beats = [i for i in r.constrained if (scores[f"L0.MLP.N{i}"] or -np.inf) < worst]
    assert not best_free_beats
    targets = _Targets.load(root / "L0" / "targets.safetensors")
    assert targets.neurons.tolist() == r.constrained
    fresh = tiny_model("gpt2", seed=3)
    match = _Match(0, targets, data, None, batch=32, seed=0, device=torch.device("cpu"))
    match(fresh).backward()
    grad = fresh.blocks[0].mlp.W_in.grad
    assert float(grad[:, r.free].abs().max()) == 0.0
    assert float(grad[:, r.constrained].abs().sum(0).min()) > 0.0
    assert count_hooks(fresh) == 0


def test_input_model_is_left_unchanged(built):
    model, before, result, _ = built
    assert result.model is not model
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
    assert count_hooks(model) == 0 and count_hooks(result.model) == 0


def test_resume_from_a_finished_and_from_an_interrupted_run(built, data, tmp_path):
    model, _, result, root = built
    again = build_interpretable(model, data, checkpoint_dir=root, progress=False, **SETTINGS)
    assert [r.scores for r in again.layers] == [r.scores for r in result.layers]
    assert again.layers[0].labels_after[0].text == result.layers[0].labels_after[0].text
    # interrupted after both phases trained but before the run's own state was written
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "build_state.json").unlink()
    (copy / "model.safetensors").unlink()
    resumed = build_interpretable(model, data, checkpoint_dir=copy, progress=False, **SETTINGS)
    a, b = resumed.model.state_dict(), result.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert resumed.layers[1].fidelity == result.layers[1].fidelity
    with pytest.raises(ValueError, match="other settings.*steps_per_layer"):
        build_interpretable(model, data, checkpoint_dir=root, progress=False, **{**SETTINGS, "steps_per_layer": 81})


def test_lm_task_loss_is_transformer_lens_loss(one_thread, data):
    from tl_modular.training.trainer import task_loss as _loss

    model = tiny_model("gpt2", seed=4)
    with torch.no_grad():
        ours = float(_loss(model, lm_task(data)))
        ref = float(model(data, return_type="loss"))
    assert ours == pytest.approx(ref, abs=1e-5)   # fp32 mean of 704 cross-entropies


def test_pearson_matches_numpy_and_grid_places_predictions_on_real_tokens():
    gen = torch.Generator().manual_seed(0)
    act, pred = torch.randn(5, 7, 3, generator=gen), torch.randn(5, 7, 3, generator=gen)
    w = (torch.rand(5, 7, 3, generator=gen) > 0.3).float()
    got = _pearson(act, pred, w)
    for j in range(3):
        m = w[..., j].bool()
        assert got[j] == pytest.approx(float(np.corrcoef(act[..., j][m], pred[..., j][m])[0, 1]), abs=1e-10)
    assert _pearson(act, torch.ones_like(act), w) == [0.0, 0.0, 0.0]        # constant prediction
    assert _pearson(torch.zeros_like(act), pred, w) == [None, None, None]   # nothing to predict
    tokens = torch.zeros(2, 4, dtype=torch.long)
    real = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)    # right- and left-padded
    target, weight = _grid([[[10, 5, 0], [2, 4, 6]]], torch.tensor([0, 1]), tokens, real, torch.tensor([2.0]))
    assert torch.allclose(target[..., 0], torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.4, 0.8, 1.2]]))  # fp32
    assert weight[..., 0].tolist() == real.float().tolist()
    target, weight = _grid([[None, [1, 2]]], torch.tensor([0, 1]), tokens, real, torch.tensor([1.0]))
    assert float(weight.sum()) == 0.0        # a failed context and a wrong-length one are left out


def test_bad_input_is_refused_with_a_clear_message(one_thread, data):
    model = tiny_model("gpt2", seed=3)
    with pytest.raises(ValueError, match="keep_free must be an int >= 0"):
        BuildConfig(keep_free=-1)
    with pytest.raises(ValueError, match="match_weight"):
        BuildConfig(match_weight=float("nan"))
    with pytest.raises(ValueError, match="steps_per_layer must be a positive int"):
        BuildConfig(steps_per_layer=0)
    with pytest.raises(ValueError, match="leaves none"):
        BuildConfig(neurons=4, keep_free=4)
    with pytest.raises(ValueError, match="layers"):
        BuildConfig(layers=[])
    with pytest.raises(ValueError, match=r"choose layers in 0\.\.1"):
        build_interpretable(model, data, layers=[5], progress=False)
    with pytest.raises(TypeError, match="HookedTransformer"):
        build_interpretable(torch.nn.Linear(2, 2), data, progress=False)
    with pytest.raises(TypeError, match="data must be"):
        build_interpretable(model, "some text", progress=False)
    with pytest.raises(ValueError, match="attention-only"):
        build_interpretable(tiny_model("attn_only"), data, progress=False)
    with pytest.raises(ValueError, match="keep_free=40"):
        build_interpretable(model, data, keep_free=40, progress=False)
    mask = torch.ones_like(data)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="padding"):
        build_interpretable(model, data, attention_mask=mask, progress=False)
    assert count_hooks(model) == 0


def test_resume_in_the_middle_of_a_phase_continues_the_same_trajectory(built, data, tmp_path, monkeypatch):
    model, _, result, _ = built
    calls = {"n": 0}
    original = _Match.__call__

    def interrupted(self, m):
        calls["n"] += 1
        if calls["n"] > 80 + 50:       # layer 0's 80 steps, then 50 of layer 1's (checkpointed at 40)
            raise KeyboardInterrupt
        return original(self, m)

    monkeypatch.setattr(_Match, "__call__", interrupted)
    settings = {**SETTINGS, "checkpoint_every": 20}
    with pytest.raises(KeyboardInterrupt):
        build_interpretable(model, data, checkpoint_dir=tmp_path, progress=False, **settings)
    monkeypatch.setattr(_Match, "__call__", original)
    assert [r["layer"] for r in json.loads((tmp_path / "build_state.json").read_text())["done"]] == [0]
    resumed = build_interpretable(model, data, checkpoint_dir=tmp_path, progress=False, **settings)
    a, b = resumed.model.state_dict(), result.model.state_dict()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].numel())
    assert worst <= 1e-6     # the same batches and optimizer state; fp32 reductions may differ in the last bit
    assert count_hooks(model) == 0


def test_one_later_layer_without_heldout_rows_saves_and_freezes_its_prefix(one_thread, data, tmp_path):
    model = tiny_model("gpt2", seed=5)
    res = build_interpretable(model, data, layers=1, neurons=8, keep_free=2, steps_per_layer=5, n_heldout=0,
                              checkpoint_dir=tmp_path / "ck", progress=False, warmup=1, batch_size=8)
    r = res[1]
    assert [x.layer for x in res.layers] == [1] and r.labeled == list(range(8)) and len(r.constrained) == 6
    assert r.fidelity["heldout_before"] is None and r.fidelity["heldout_after"] is None
    # building layer 1 alone still freezes everything its neurons depend on: block 0 and the embeddings
    assert {"embed.W_E", "pos_embed.W_pos", "blocks.0.mlp.W_in", "blocks.1.mlp.W_in"} <= set(r.frozen)
    saved = json.loads((res.save(tmp_path / "out") / "result.json").read_text())
    assert saved["schema"] == "tl_modular.build_interpretable" and saved["layers"][0]["constrained"] == r.constrained
    assert (tmp_path / "out" / "L1" / "labels_after.json").exists()
    with pytest.raises(KeyError, match="was not built"):
        res[0]


def test_an_llm_failure_leaves_its_unit_unconstrained_and_other_errors_propagate():
    from types import SimpleNamespace

    from tl_modular.labeling import LLMError
    from tl_modular.training.targets import _simulate

    class Sim:
        async def asimulate(self, text, contexts, signed):
            if text == "fails":
                raise LLMError("server error after the retries", reason="server_error")
            if text == "bug":
                raise ValueError("a defect, not an LLM failure")
            return SimpleNamespace(predictions=[[1.0, 2.0] for _ in contexts], errors=[])

    preds, errors = _simulate(Sim(), ["ok", "fails"], [["a", "b"], ["c", "d"]])
    assert preds == [[[1.0, 2.0], [1.0, 2.0]], [None, None]]
    assert errors[0] is None and errors[1].startswith("LLMError: server error")
    with pytest.raises(ValueError, match="a defect"):
        _simulate(Sim(), ["ok", "bug"], [["a"]])
