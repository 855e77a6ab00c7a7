"""The shipped workbench model: accuracy bars and its documented ground truth."""

from __future__ import annotations

import time

import pytest
import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular._models import count_hooks
from tl_modular.patching import channel_effect, mean_writes, patch_channels
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


def test_previous_token_head_feeds_the_induction_keys(model, facts):
    heads = facts["heads"]
    # The previous-token head carries most of the induction logit difference ...
    effect = channel_effect(model, toy.induction(512, seed=123), [heads["previous_token"]]).fraction
    assert effect >= 0.5
    # ... through the keys of the later heads: its routes into them, directly and through the
    # MLP of its layer, carry at least half of it.
    composition = gt.key_composition_fraction(model, heads)
    assert composition >= 0.5
    assert composition == pytest.approx(facts["key_composition_fraction"], abs=0.05)
    # Path patching (Wang et al.: attention heads in between clean, the MLP in between recomputed
    # as part of the path): the previous-token head -> induction heads' keys path carries most of it.
    induction_heads = gt.induction_heads(model)
    assert induction_heads == facts["induction_heads"] and heads["induction"] == induction_heads[0]
    path = gt.induction_path_fraction(model, heads["previous_token"], induction_heads)
    assert path >= 0.5
    assert path == pytest.approx(facts["induction_path_fraction"], abs=0.03)
    # The single direct edge to the top induction head is documented, not required: the model
    # spreads induction over four heads and relays the previous token through MLP0 as well.
    direct = gt.induction_route_fraction(model, heads)
    assert direct == pytest.approx(facts["induction_route_fraction"], abs=0.05)


def test_documented_ablation_facts(model, facts):
    table = gt.ablation_accuracy(model, n=256, seed=99)
    prev = facts["heads"]["previous_token"]
    # The previous-token head is needed for induction, not for sorting or modular addition.
    assert table[prev]["induction"] <= 0.5
    for task in ("modular_addition", "sorting"):
        assert table[prev][task] >= table["none"][task] - 0.05
    # The induction heads of layer 1 back each other up: no single one matters, together they do.
    later_heads = [c.name for c in tlm.segment(model).of_kind("head") if c.layer == 1]
    assert all(table[h]["induction"] >= 0.9 for h in later_heads)
    channels = tlm.segment(model)
    task = toy.induction(256, seed=99)
    means = mean_writes(model, channels, task.clean, later_heads)
    with torch.no_grad():
        assert task.accuracy(patch_channels(model, channels, task.clean, later_heads, means)) <= 0.5
    # Every task needs some component: its worst single ablation costs at least 10 points.
    for task_name, base in table["none"].items():
        worst = min(row[task_name] for name, row in table.items() if name != "none")
        assert worst <= base - 0.10, task_name


def test_half_the_dimensions_keep_every_task_within_two_points(model):
    tokens, mask = toy.mixed_tokens(n_per_task=256, seed=0)
    comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
    half = comp.truncated(budget=comp.max_total_rank // 2)
    tasks = {name: gen(512, seed=11) for name, gen in toy.GENERATORS.items()}
    tasks["modular_addition_heldout"] = toy.modular_addition(None, split="test")
    with torch.no_grad():
        clean = {name: t.accuracy(model(t.clean)) for name, t in tasks.items()}
        with half.applied(model):
            compressed = {name: t.accuracy(model(t.clean)) for name, t in tasks.items()}
    for name in tasks:
        assert compressed[name] >= clean[name] - 0.02, (name, clean[name], compressed[name])
    assert count_hooks(model) == 0
