"""Model diffing against planted ground truth: a model diffed with itself is empty; one planted
change (a head's W_O rotated into the orthogonal complement, one route added) comes out on top."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import networkx as nx
import numpy as np
import pytest
import scipy.linalg
import torch

import tl_modular as tlm
from tl_modular.circuits import Circuit, CircuitSet
from tl_modular.diffing import ModelDiff, principal_angles
from tl_modular.graph import ChannelGraph
from tl_modular.testing import planted_modules, tiny_model

HEAD = "L1.H2"


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randint(0, 50, (24, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def pair(data):
    """(model, comp, graph) and a copy whose L1.H2 writes into the orthogonal complement of its W_O rows."""
    model = tiny_model("gpt2", seed=0)
    rotated = copy.deepcopy(model)
    with torch.no_grad():
        w = rotated.blocks[1].attn.W_O[2]                             # [d_head, d_model]
        q, _ = torch.linalg.qr(w.T.double())                           # row space [d_model, d_head]
        full, _ = torch.linalg.qr(torch.cat([q, torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
                                             .double()], 1))
        c = full[:, 4:8]                                               # orthogonal to the row space
        w.copy_((w.double() @ q @ c.T).to(w))
    out = []
    for m in (model, rotated):
        comp = tlm.compress(m, data, progress=False, energy=0.999)
        out.append((m, comp, tlm.build_graph(comp, model=m, tokens=data, progress=False)))
    return out


def test_principal_angles_match_scipy_and_closed_forms():
    gen = torch.Generator().manual_seed(0)
    for ra, rb in ((3, 3), (2, 5), (6, 1)):
        qa, _ = torch.linalg.qr(torch.randn(20, ra, generator=gen, dtype=torch.float64))
        qb, _ = torch.linalg.qr(torch.randn(20, rb, generator=gen, dtype=torch.float64))
        ours = principal_angles(qa, qb).numpy()
        ref = np.sort(scipy.linalg.subspace_angles(qa.numpy(), qb.numpy()))
        np.testing.assert_allclose(ours, ref, atol=1e-10)
    # closed form: span(e0, e1) against span(e0, cos t e1 + sin t e2) has angles (0, t), exact for small t
    for t in (1e-7, 1e-3, 0.7, np.pi / 2):
        qa = torch.eye(5, dtype=torch.float64)[:, :2]
        qb = torch.zeros(5, 2, dtype=torch.float64)
        qb[0, 0], qb[1, 1], qb[2, 1] = 1, np.cos(t), np.sin(t)
        np.testing.assert_allclose(principal_angles(qa, qb).numpy(), [0, t], rtol=1e-9, atol=1e-15)


def test_self_diff_is_empty(pair, tmp_path):
    _, comp, graph = pair[0]
    d = tlm.diff(graph, graph)
    assert d.is_empty and d.changed_channels() == [] and d.moved_channels() == []
    assert max(c.max_angle for c in d.channels) < 1e-6
    assert all(r.delta == 0 for r in d.routes + d.routes_other)
    assert d.modules["ari"] == pytest.approx(1.0)
    assert {c.side for c in d.channels} >= {"read:q", "read:k", "read:v", "read:in", "write"}
    assert len(d.channels) == sum(len(c.sides) for c in comp.channels.values())
    # saved (float32) against in-memory (float64): fp noise only
    graph.save(tmp_path / "g")
    comp.save(tmp_path / "g")
    d2 = tlm.diff(tmp_path / "g", comp)
    assert d2.is_empty and max(c.max_angle for c in d2.channels) < 1e-2
    assert "no change" in d.summary()


def test_rotated_head_write_is_the_top_change(pair):
    (_, comp_a, ga), (_, comp_b, gb) = pair
    d = tlm.diff(comp_a, comp_b)
    top = d.channels[0]
    assert (top.channel, top.side) == (HEAD, "write")
    np.testing.assert_allclose(top.angles, [90.0] * len(top.angles), atol=1e-3)
    assert top.mean_sin2 == pytest.approx(1.0, abs=1e-8)
    # upstream of the change, and every other head's write, is untouched
    for c in d.channels:
        if c.channel.startswith("L0.") or (c.side == "write" and c.channel != HEAD):
            assert c.max_angle < 1e-3, c
    assert d.top_channels(1)[0].channel == HEAD
    assert HEAD in d.changed_channels()


def test_planted_route_is_the_only_route_change(pair):
    _, _, graph = pair[0]
    routes = graph.routes("static")
    weakest = min((r for r in routes if r[0].startswith("L0")), key=routes.get)
    g = graph.nx.copy()
    g.edges[weakest]["static"] = 3 * max(routes.values())
    planted = ChannelGraph(g, graph.model_fingerprint, dict(graph.config), graph.compression)
    d = tlm.diff(graph, planted, weight="static")
    assert d.top_routes(1)[0].route == weakest
    assert d.top_routes(1)[0].relative > 0.9
    assert all(abs(r.delta) < 1e-12 for r in d.routes[1:])
    # a global rescaling of every strength is no change at all
    scaled = graph.nx.copy()
    for _, _, e in scaled.edges(data=True):
        if e["kind"] == "route":
            e["static"] *= 7.0
    d2 = tlm.diff(graph, ChannelGraph(scaled, None, dict(graph.config)), weight="static", modules=False)
    assert max(abs(r.delta) for r in d2.routes) < 1e-12


def test_module_reassignment_and_ari():
    model, truth, _ = planted_modules(leak=0.05)
    tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    graph = tlm.build_graph(tlm.compress(model, tokens, progress=False), model=model, progress=False)
    mods = graph.modules()
    assert len(mods) == 3
    same = tlm.diff(graph, graph)
    assert same.moved_channels() == [] and same.modules["ari"] == 1.0
    mover = sorted(mods[0])[0]
    # cut the mover off its module and tie it to another with routes stronger than everything else
    g = graph.nx.copy()
    big = 10 * max(graph.routes().values())
    for (w, p) in graph.routes():
        ends = {w, graph.owner(p)}
        if mover in ends:
            g.edges[(w, p)]["static"] = big if ends & mods[1] else 0.0
    d = tlm.diff(graph, ChannelGraph(g, None, dict(graph.config)))
    assert d.moved_channels() == [mover], d.modules
    n = len(truth)
    assert d.modules["ari"] < 1.0 and d.modules["ari"] > 1 - 4 / n
    before, after = d.modules["moves"][mover]
    assert mover in d.modules["modules_a"][before] and mover in d.modules["modules_b"][after]
    assert set(mods[1]) <= set(d.modules["modules_b"][after])


def _circuit(cat, routes):
    return Circuit(category=cat, routes=routes, scores={r: 1.0 for r in routes}, curve=[], target=0.9,
                   faithfulness=0.9, faithfulness_interval=(0.8, 1.0), completeness=0.5,
                   completeness_interval=(0.4, 0.6))


def test_circuits_and_labels(pair, tmp_path):
    _, comp, graph = pair[0]
    r = sorted(graph.routes())
    ca = CircuitSet({"x": _circuit("x", r[:3]), "y": _circuit("y", r[3:5])}, len(r))
    cb = CircuitSet({"x": _circuit("x", [r[1], r[2], r[7]]), "y": _circuit("y", r[3:5])}, len(r))
    graph.save(tmp_path / "a")
    ca.save(tmp_path / "a")
    labels_b = SimpleNamespace(labels={"L0.H1": SimpleNamespace(text="previous token"),
                                       "L1.MLP": SimpleNamespace(text="digits")})
    d = tlm.diff(tmp_path / "a", graph, {"L0.H1": "previous token", "L0.H0": "bos"}, labels_b, circuits_b=cb)
    assert list(d.circuits) == ["x", "y"]                       # most changed first
    assert d.circuits["x"]["gained"] == [list(r[7])] and d.circuits["x"]["lost"] == [list(r[0])]
    assert d.circuits["x"]["jaccard"] == pytest.approx(2 / 4)
    assert d.circuits["y"]["gained"] == [] and d.circuits["y"]["jaccard"] == 1.0
    assert d.labels == [{"unit": "L0.H0", "a": "bos", "b": None}, {"unit": "L1.MLP", "a": None, "b": "digits"}]
    assert not d.is_empty
    text = d.summary()
    assert "Circuit x" in text and "L1.MLP" in text
    # graphs in memory: circuits come from circuits_a / circuits_b alone
    mem = tlm.diff(graph, graph, circuits_a=ca, circuits_b=cb)
    assert list(mem.circuits) == ["x", "y"] and mem.circuits["x"]["jaccard"] == pytest.approx(2 / 4)
    assert not tlm.diff(graph, graph).circuits
    with pytest.raises(TypeError, match="text"):
        tlm.diff(graph, graph, {"L0.H0": 3})


def test_save_load_and_plot(pair, tmp_path):
    (_, _, ga), (_, _, gb) = pair
    d = tlm.diff(ga, gb, names=("before", "after"))
    d.save(tmp_path)
    raw = json.loads((tmp_path / "diff.json").read_text())
    assert raw["schema"] == "tl_modular.ModelDiff" and raw["version"] == 1
    back = ModelDiff.load(tmp_path)
    assert back.to_json() == d.to_json()
    assert back.top_routes(3)[0].route == d.top_routes(3)[0].route
    assert back.summary() == d.summary()
    ax = d.plot(gb, tmp_path / "diff.png")
    assert (tmp_path / "diff.png").stat().st_size > 1000
    import matplotlib.pyplot as plt
    plt.close(ax.figure)


def test_diff_null_moves_each_tensor_as_far_as_b_in_random_directions(pair):
    (model, *_), (rotated, *_) = pair
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pa = {k: v.detach() for k, v in model.named_parameters()}
    pb = {k: v.detach() for k, v in rotated.named_parameters()}
    nulls = list(tlm.diff_null(model, rotated, n=3, seed=0))
    assert len(nulls) == 3
    changed = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert changed == ["blocks.1.attn.W_O"]
    for m in nulls:
        for k, p in m.named_parameters():
            p = p.detach()
            if k in changed:
                step, want = p - pa[k], pb[k] - pa[k]
                assert step.norm() == pytest.approx(float(want.norm()), rel=1e-5)   # float32 sums
                cos = float((step * want).sum() / (step.norm() * want.norm()))
                assert abs(cos) < 0.5                        # a random direction, not b's (d = 512)
            else:
                assert torch.equal(p, pa[k])                 # what b left alone stays
    assert not torch.equal(dict(nulls[0].named_parameters())["blocks.1.attn.W_O"],
                           dict(nulls[1].named_parameters())["blocks.1.attn.W_O"])
    again = next(tlm.diff_null(model, rotated, n=1, seed=0))
    assert torch.equal(dict(again.named_parameters())["blocks.1.attn.W_O"],
                       dict(nulls[0].named_parameters())["blocks.1.attn.W_O"])      # seeded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # inputs untouched
    with pytest.raises(ValueError, match="positive number"):
        next(tlm.diff_null(model, rotated, n=0))
    with pytest.raises(ValueError, match="parameters differ"):
        next(tlm.diff_null(model, tiny_model("gpt2", seed=0, d_model=24)))


@pytest.fixture(scope="module")
def null_graphs(pair, data):
    (model, *_), (rotated, *_) = pair
    out = []
    for m in tlm.diff_null(model, rotated, n=3, seed=0):
        out.append(tlm.build_graph(tlm.compress(m, data, progress=False, energy=0.999), model=m, tokens=data,
                                   progress=False))
    return out


def test_null_ranks_changes_above_chance_first(pair, null_graphs, tmp_path):
    (_, _, ga), (_, _, gb) = pair
    plain = tlm.diff(ga, gb, modules=False)
    d = tlm.diff(ga, gb, null=null_graphs, modules=False)
    assert all(r.z is None for r in plain.routes) and all(c.z is None for c in plain.channels)
    # the rotated head is still the top channel, and far above what a random move of L1's W_O does
    top = d.channels[0]
    assert (top.channel, top.side) == (HEAD, "write") and top.z > 3
    assert all(c.z < 1 for c in d.channels[1:])
    # z is each change over its RMS change to the null models, floored at 0.1 of the median RMS
    chance = [{x.route: x.delta for x in tlm.diff(ga, g, modules=False).routes} for g in null_graphs]
    rms = {r.route: np.sqrt(np.mean([c[r.route] ** 2 for c in chance])) for r in d.routes}
    floor = 0.1 * np.median(list(rms.values()))
    for r in d.routes:
        assert r.z == pytest.approx(r.delta / max(rms[r.route], floor), rel=1e-9, abs=1e-12)
    assert [abs(r.z) for r in d.routes] == sorted((abs(r.z) for r in d.routes), reverse=True)
    # every top route by z touches the changed head (its write, or its inputs' gradients)
    assert all(HEAD in (r.writer, r.port.partition(":")[0]) for r in d.top_routes(4)), d.top_routes(4)
    assert sum(HEAD in (r.writer, r.port.partition(":")[0]) for r in plain.top_routes(4)) < 4
    assert "null models" in d.summary() and d.meta["n_null"] == 3
    d.save(tmp_path / "d")
    back = ModelDiff.load(tmp_path / "d")
    assert [r.z for r in back.routes] == [r.z for r in d.routes]
    # a diff against itself with a null: empty, every z zero (channels: fp noise over the floor)
    same = tlm.diff(ga, ga, null=null_graphs, modules=False)
    assert same.is_empty and all(r.z == 0 for r in same.routes) and all(c.z < 1e-6 for c in same.channels)
    with pytest.raises(ValueError, match="holds no null models"):
        tlm.diff(ga, gb, null=[])
    with pytest.raises(ValueError, match="lack data strengths"):
        g = null_graphs[0]
        tlm.diff(ga, gb, null=[ChannelGraph(g.nx, None, {**g.config, "weight": "static"}, g.compression)])
    with pytest.raises(ValueError, match="different channels or routes"):
        tlm.diff(ga, gb, null=[ChannelGraph(nx.DiGraph(), None, dict(ga.config))])


def test_bad_input_is_refused(pair, data):
    _, comp, graph = pair[0]
    other = tiny_model("gpt2", seed=0, n_heads=2, d_head=8)
    comp_other = tlm.compress(other, data, progress=False)
    with pytest.raises(ValueError, match="different channels"):
        tlm.diff(comp, comp_other)
    wide = tiny_model("gpt2", seed=0, d_model=24)
    with pytest.raises(ValueError, match="d_model differs"):
        tlm.diff(comp, tlm.compress(wide, data, progress=False))
    bare = lambda g: ChannelGraph(g.nx, None, dict(g.config))  # noqa: E731
    with pytest.raises(ValueError, match="different channels or routes"):
        tlm.diff(bare(graph), bare(tlm.build_graph(comp_other, model=other, progress=False)))
    with pytest.raises(TypeError, match="Compression, a ChannelGraph"):
        tlm.diff(comp, 3)
    with pytest.raises(ValueError, match="two compressions or two graphs"):
        tlm.diff(comp, ChannelGraph(nx.DiGraph(graph.nx), None, dict(graph.config)))
    with pytest.raises(ValueError, match="weight must be"):
        tlm.diff(graph, graph, weight="data2")


@pytest.mark.slow
def test_finetuning_on_one_task_changes_its_circuit_most():
    """Issue 9's criterion, met by the changes *against chance* (``null=``): the raw changes rank
    the strong routes every task shares first (4-8 of the top 10 in induction's circuit, but as
    many in the larger brackets and sorting circuits; benchmarks/diff_finetune.py)."""
    from tl_modular import toy

    torch.manual_seed(0)
    model = toy.load_model()
    tokens, mask, scored = toy.mixed_tokens(n_per_task=64, seed=2, scored=True)

    def graph_of(m):
        comp = tlm.compress(m, tokens, attention_mask=mask, progress=False)
        return tlm.build_graph(comp, model=m, tokens=tokens, attention_mask=mask, loss_mask=scored,
                               metric="logit", progress=False)

    ga = graph_of(model)
    tasks = {name: gen(64, seed=5) for name, gen in toy.GENERATORS.items()}
    circuits = ga.circuits(model, tasks, n_boot=20, n_random=1, batch_size=64, progress=False)
    for seed in (0, 1, 2, 3):
        tuned = copy.deepcopy(model)
        # gentle: the task loss is ~1e-6 already; eps 1e-6 keeps weights with negligible gradient in place
        toy.train(tuned, toy.induction(2000, seed=77), steps=200, warmup=0, lr=1e-4, eps=1e-6, weight_decay=0.0,
                  eval_every=10_000, progress=False, seed=seed)
        assert min(toy.evaluate(tuned, toy.eval_tasks(256)).values()) > 0.95   # gentle: no task is lost
        null = [graph_of(m) for m in tlm.diff_null(model, tuned, n=3, seed=seed)]
        d = tlm.diff(ga, graph_of(tuned), null=null, modules=False)
        top = {r.route for r in d.top_routes(10)}
        overlap = {k: len(top & set(c.routes)) for k, c in circuits.items()}
        assert all(overlap["induction"] > v for k, v in overlap.items() if k != "induction"), (seed, overlap)
