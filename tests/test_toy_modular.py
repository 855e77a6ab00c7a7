"""The shipped modular variant of the bundled model: accuracy, and modules that are real.

``tools/train_toy_modular.py`` wrote it (the bundled model continued with the modularity loss);
these tests re-measure what it recorded, on the graph ``tl-modular analyze`` builds.
"""

from __future__ import annotations

import pytest
import torch

import tl_modular as tlm
from tl_modular import toy


@pytest.fixture(scope="module")
def model():
    return toy.load_modular_model()


@pytest.fixture(scope="module")
def facts():
    return toy.info(toy.MODULAR_DIR)


@pytest.fixture(scope="module")
def graph(model):
    tokens, mask, scored = toy.mixed_tokens(n_per_task=128, seed=0, scored=True)   # the report's data
    comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
    return tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored, metric="logit",
                           progress=False)


def test_loads_offline_small_and_differs_from_the_plain_model(model):
    plain = toy.load_model()
    assert model.cfg.n_layers == plain.cfg.n_layers and model.cfg.d_model == plain.cfg.d_model
    assert not torch.equal(model.W_O, plain.W_O)
    size = sum(p.stat().st_size for p in toy.MODULAR_DIR.rglob("*") if p.is_file())
    assert size <= 5 * 2 ** 20                      # checkpoint and SAEs together


def test_accuracy_on_every_task(model, facts):
    accuracy = toy.evaluate(model, toy.eval_tasks(n=1024, seed=777))
    for task, acc in accuracy.items():
        assert acc >= 0.95, f"{task}: {acc:.3f}"
        assert facts["accuracy"][task] >= 0.95


def test_read_write_alignment_stays_inside_the_modules(model, facts):
    from tl_modular.training import ModularityLoss

    plain, modular = ModularityLoss(), ModularityLoss()
    plain.assign(toy.load_model(), facts["loss_modules"])
    modular.assign(model, facts["loss_modules"])
    assert modular.cross_fraction(model) <= 0.01 < 0.5 <= plain.cross_fraction(toy.load_model())


def test_the_loss_modules_are_significant_on_the_graph(graph, facts):
    modules = facts["loss_modules"]
    assert len([m for m in modules if len(m) >= 2]) >= 3
    # their z-score against the graph's null (route strengths permuted within layer pairs), the
    # partition held fixed on the graph and on every null graph, as train_modular measures it
    res = graph.modularity(modules=modules, n_null=200, seed=0, progress=False)["Q"]
    assert res["z"] >= 2.0 and res["p"] <= 0.05, res
    assert res["z"] == pytest.approx(facts["loss_modules_Q"]["z"], abs=0.3)


def test_the_graph_finds_the_trained_modules_itself(graph, facts):
    """What the report shows: the Gomory–Hu rule on data strengths recovers the loss's modules."""
    found = {frozenset(m) for m in graph.modules()}
    assert found == {frozenset(m) for m in facts["loss_modules"]}
    assert len(found) >= 3


def test_its_saes_fit_and_the_report_inputs_use_them(model):
    inputs = tlm.report.bundled_inputs(variant="modular", n_per_task=8, n_examples=8)
    assert tlm._models.fingerprint(inputs.model) == tlm._models.fingerprint(model)
    assert {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid"} <= set(inputs.saes)
    assert len(inputs.modules["modules"]) >= 3
    with pytest.raises(ValueError, match="variant"):
        tlm.report.bundled_inputs(variant="huge")
