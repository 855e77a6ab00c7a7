"""The shipped workbench model: accuracy bars and its documented ground truth."""

from __future__ import annotations

import time

import pytest
import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular._models import count_hooks
from tl_modular.toy import ground_truth as gt


@pytest.fixture(scope="module")
def model():
    return toy.load_model()


@pytest.fixture(scope="module")
def facts():
    return toy.info()


def test_load_is_offline_fast_and_complete(model):
    start = time.perf_counter()
    again = toy.load_model()
    assert time.perf_counter() - start < 5.0  # TransformerLens is already imported here
    assert model.cfg.n_layers == 2 and model.cfg.d_model <= 128 and not model.cfg.attn_only
    assert model.cfg.d_vocab == len(toy.VOCAB)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    assert toy.decode(model.to_tokens("ADD 3 + 4 =")[0]) == "ADD 3 + 4 ="
    size = sum(p.stat().st_size for p in toy.BUNDLED_DIR.iterdir())
    assert size <= 5 * 2 ** 20


def test_accuracy_on_every_task_including_held_out_pairs(model):
    accuracy = toy.evaluate(model, toy.eval_tasks(n=1024, seed=777))
    assert set(accuracy) == {"induction", "modular_addition", "modular_addition_heldout", "brackets",
                             "sorting"}
    for task, acc in accuracy.items():
        assert acc >= 0.95, f"{task}: {acc:.3f}"


def test_documented_heads_are_the_detected_heads(model, facts):
    scores = gt.head_scores(model)
    heads = gt.known_heads(model, scores)
    assert heads == facts["heads"]
    prev, ind = (tlm.segment(model)[heads[k]] for k in ("previous_token", "induction"))
    assert scores["previous_token"][prev.layer, prev.head] >= 0.5
    assert scores["induction"][ind.layer, ind.head] >= 0.5
    assert count_hooks(model) == 0


def test_previous_token_to_induction_key_route_carries_most_of_the_logit_difference(model, facts):
    fraction = gt.induction_route_fraction(model, facts["heads"])
    assert fraction >= 0.5
    assert fraction == pytest.approx(facts["induction_route_fraction"], abs=0.05)


def test_documented_ablation_facts(model, facts):
    table = gt.ablation_accuracy(model, n=256, seed=99)
    induction_head = facts["heads"]["induction"]
    # The induction head is needed for induction and for nothing else.
    assert table[induction_head]["induction"] <= 0.5
    for task in ("modular_addition", "brackets", "sorting"):
        assert table[induction_head][task] >= table["none"][task] - 0.05
    # Every task needs some component: its worst single ablation costs at least 10 points.
    for task, base in table["none"].items():
        worst = min(row[task] for name, row in table.items() if name != "none")
        assert worst <= base - 0.10, task
