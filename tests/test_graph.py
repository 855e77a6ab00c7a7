"""The compressed computational graph: min cuts, planted modules and routes, nulls, files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import networkx as nx
import numpy as np
import pytest
import torch

import tl_modular as tlm
from tl_modular._models import count_hooks
from tl_modular.graph import mincut as _mincut
from tl_modular.graph import spearman
from tl_modular.testing import planted_modules, tiny_model


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    """ARI from the contingency table (Hubert & Arabie), written out as the independent reference."""
    comb = lambda n: n * (n - 1) / 2  # noqa: E731
    table: dict[tuple[int, int], int] = {}
    for x, y in zip(a, b, strict=True):
        table[(x, y)] = table.get((x, y), 0) + 1
    rows: dict[int, int] = {}
    cols: dict[int, int] = {}
    for (x, y), n in table.items():
        rows[x] = rows.get(x, 0) + n
        cols[y] = cols.get(y, 0) + n
    index = sum(comb(n) for n in table.values())
    sr, sc = sum(comb(n) for n in rows.values()), sum(comb(n) for n in cols.values())
    expected = sr * sc / comb(len(a))
    top = (sr + sc) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def random_graph(n: int, p: float, seed: int, integer: bool = False) -> nx.Graph:
    rng = np.random.default_rng(seed)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for u, v in itertools.combinations(range(n), 2):
        if rng.random() < p:
            g.add_edge(u, v, capacity=float(rng.integers(1, 5)) if integer else float(rng.exponential()))
    return g


# --- Gomory–Hu trees and cuts -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["networkx", "igraph"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gomory_hu_equals_brute_force_min_cuts(backend, seed):
    g = random_graph(10, 0.4, seed, integer=seed == 2)   # seed 2: many tied cut values
    tree = _mincut.gomory_hu_tree(g, backend)
    assert nx.is_tree(tree) and set(tree.nodes) == set(g.nodes)
    cuts = _mincut.pairwise_min_cuts(tree)
    for u, v in itertools.combinations(g.nodes, 2):
        flow_graph = nx.Graph()
        flow_graph.add_nodes_from(g.nodes)
        flow_graph.add_edges_from(g.edges(data=True))
        exact = nx.minimum_cut_value(flow_graph, u, v, capacity="capacity")
        assert cuts[(u, v)] == pytest.approx(exact, rel=1e-7, abs=1e-9)
        assert _mincut.tree_min_cut(tree, u, v) == pytest.approx(cuts[(u, v)])


def test_backends_agree_on_cut_values_and_modules():
    g = random_graph(30, 0.25, seed=5)
    a, b = _mincut.gomory_hu_tree(g, "networkx"), _mincut.gomory_hu_tree(g, "igraph")
    ca, cb = _mincut.pairwise_min_cuts(a), _mincut.pairwise_min_cuts(b)
    assert max(abs(ca[k] - cb[k]) / max(ca[k], 1e-12) for k in ca) < 1e-7
    # continuous random capacities: no tied cut values, so the modules must be equal too
    # (min_size=1: in this random graph every larger side is admissible only whole)
    ma = _mincut.find_modules(g, min_size=1, n_modules=4, backend="networkx")[0]
    mb = _mincut.find_modules(g, min_size=1, n_modules=4, backend="igraph")[0]
    assert len(ma) == 4 and sorted(map(sorted, ma)) == sorted(map(sorted, mb))
    with pytest.raises(ValueError, match="n_modules=4 is more than this graph can give: at most 1 modules"):
        _mincut.find_modules(g, min_size=3, n_modules=4)


def test_tree_cutting_respects_min_size_and_components_thresholds():
    # two dense cliques joined by one weak edge, plus a pendant node on the first
    g = nx.Graph()
    for clique in (range(0, 4), range(4, 8)):
        g.add_edges_from((u, v, {"capacity": 5.0}) for u, v in itertools.combinations(clique, 2))
    g.add_edge(3, 4, capacity=1.0)
    g.add_edge(0, 8, capacity=0.5)
    tree = _mincut.gomory_hu_tree(g, "networkx")
    splits = _mincut.hierarchy(tree, min_size=2)
    assert splits[0].value == pytest.approx(1.0)           # the pendant's 0.5 cut is too small a side
    assert {splits[0].left, splits[0].right} == {frozenset({0, 1, 2, 3, 8}), frozenset({4, 5, 6, 7})}
    parts, _, _ = _mincut.find_modules(g, min_size=2)
    assert sorted(map(sorted, parts)) == [[0, 1, 2, 3, 8], [4, 5, 6, 7]]
    comps = _mincut.components(tree, threshold=0.75)
    assert sorted(map(sorted, comps)) == [[0, 1, 2, 3, 4, 5, 6, 7], [8]]
    for comp in comps:                                      # every pair inside beats the threshold
        for u, v in itertools.combinations(comp, 2):
            assert nx.minimum_cut_value(g, u, v, capacity="capacity") > 0.75


def test_partition_scores_match_networkx_and_hand_values():
    g = nx.Graph()
    g.add_edge("a", "b", capacity=2.0)
    g.add_edge("c", "d", capacity=2.0)
    g.add_edge("b", "c", capacity=1.0)
    parts = [frozenset("ab"), frozenset("cd")]
    scores = _mincut.partition_scores(g, parts)
    assert scores["crossing"] == pytest.approx(1 / 5)
    assert scores["ncut"] == pytest.approx(2 * 1 / 5)                   # cut 1 over volume 5, twice
    assert scores["Q"] == pytest.approx(nx.community.modularity(g, parts, weight="capacity"))


# --- graphs of models ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    model, truth, routes = planted_modules(leak=0.05)
    tokens = torch.randint(0, 64, (64, 24), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens, progress=False)
    graph = tlm.build_graph(comp, model=model, tokens=tokens, progress=False)
    return model, truth, routes, tokens, comp, graph


def test_graph_structure_and_hooks(planted):
    model, _, _, _, comp, graph = planted
    g = graph.nx
    assert count_hooks(model) == 0
    assert {"L1.H2:q", "L1.H2:k", "L1.H2:v", "unembed", "embed", "L2.MLP"} <= set(g.nodes)
    assert g.nodes["L1.H2:k"]["kind"] == "port" and g.has_edge("L1.H2:k", "L1.H2")
    assert g.nodes["L1.H2"]["write_rank"] == comp["L1.H2"].write.rank
    # routes only run forwards: a layer's heads feed its MLP, never an earlier reader
    assert g.has_edge("L1.H0", "L1.MLP") and not g.has_edge("L1.MLP", "L1.H0:q")
    assert not g.has_edge("L1.H0", "L1.H1:q") and g.has_edge("embed", "unembed")
    for _, _, d in g.edges(data=True):
        if d["kind"] == "route":
            assert d["static"] >= 0 and d["data"] >= 0 and 0 <= d["share"] <= 1 + 1e-9


@pytest.mark.parametrize("weight", ["static", "data"])
def test_planted_modules_are_recovered(planted, weight):
    _, truth, _, _, _, graph = planted
    modules = graph.modules(weight=weight)
    found = {n: i for i, m in enumerate(modules) for n in m}
    names = sorted(truth)
    assert set(found) == set(names)                       # modules list channels only
    assert adjusted_rand_index([truth[n] for n in names], [found[n] for n in names]) >= 0.95
    # the same modules from both backends
    assert sorted(map(sorted, graph.modules(weight=weight, backend="networkx"))) == sorted(map(sorted, modules))
    hierarchy = graph.hierarchy(weight=weight)
    assert len(hierarchy) >= 2 and hierarchy[0].value <= hierarchy[1].value
    assert all(":" not in n and n != "unembed" for s in hierarchy for n in s.parent)


def test_module_rule_is_one_value_for_the_keywords(planted):
    """A ModuleRule gives what its keywords give, in every method that cuts modules; it compares and
    hashes by value; a rule and differing keywords together are refused."""
    replace = dataclasses.replace
    *_, graph = planted
    rule = tlm.ModuleRule(weight="static", n_modules=2, backend="networkx")
    assert rule == tlm.ModuleRule(backend="networkx", n_modules=2, weight="static") and len({rule, replace(rule)}) == 1
    assert rule != replace(rule, n_modules=3)
    assert graph.modules(rule) == graph.modules(weight="static", n_modules=2, backend="networkx")
    assert len(graph.modules(rule)) == 2
    assert graph.hierarchy(rule) == graph.hierarchy(weight="static", backend="networkx")
    a = graph.modularity(rule, n_null=5, seed=1, progress=False)
    b = graph.modularity(weight="static", n_modules=2, backend="networkx", n_null=5, seed=1, progress=False)
    assert a == b and a["modules"] == 2
    # the rule resolves the graph's default weight; keywords at their defaults go along with a rule
    assert graph.module_rule().weight == graph.weight == "data"
    assert graph.module_rule(rule, io=False) == rule
    with pytest.raises(ValueError, match="not both.*n_modules="):
        graph.modules(rule, n_modules=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.io = True


@pytest.mark.parametrize("weight", ["static", "data"])
def test_planted_routes_are_the_strongest_into_their_ports(planted, weight):
    _, _, routes, _, _, graph = planted
    strengths = graph.routes(weight)
    for writer, port in routes:
        into = {w: s for (w, p), s in strengths.items() if p == port}
        assert max(into, key=into.get) == writer


def test_planted_cross_module_routes_carry_only_the_leak(planted):
    model, truth, _, tokens, comp, _ = planted
    # without leak the blocks are exactly separate: every cross-module route is zero
    exact, truth0, _ = planted_modules(leak=0.0)
    comp0 = tlm.compress(exact, tokens, progress=False)
    g0 = tlm.build_graph(comp0, model=exact, tokens=tokens[:16], progress=False)
    inside = [s for (w, p), s in g0.routes("static").items() if w in truth0 and g0.owner(p) in truth0
              and truth0[w] == truth0[g0.owner(p)]]
    for (w, p), d in ((k, g0.nx.edges[k]) for k in g0.routes("static")):
        o = g0.owner(p)
        if w in truth0 and o in truth0 and truth0[w] != truth0[o]:
            assert d["static"] <= 1e-9 * max(inside) and abs(d["attribution"]) < 1e-9


def test_null_model_separates_planted_from_unstructured(planted):
    *_, graph = planted
    result = graph.modularity(weight="data", n_null=200, seed=0, progress=False)
    assert result["modules"] == 3 and result["Q"]["p"] < 0.01 and result["Q"]["z"] > 2
    assert result["crossing"]["value"] < result["crossing"]["null_mean"]
    model, _, _ = planted_modules(structured=False)
    tokens = torch.randint(0, 64, (64, 24), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens, progress=False)
    flat = tlm.build_graph(comp, model=model, tokens=tokens, progress=False)
    for weight in ("static", "data"):
        assert flat.modularity(weight=weight, n_null=100, seed=0, progress=False)["Q"]["p"] > 0.05


def test_modularity_of_given_modules(planted):
    """A fixed partition is scored on the graph and on every null alike: the planted modules stand out,
    a partition cutting across them does not; its crossing equals the hand count."""
    _, truth, _, _, _, graph = planted
    true_modules = [{n for n, m in truth.items() if m == k} for k in sorted(set(truth.values()))]
    right = graph.modularity(weight="data", n_null=100, seed=0, modules=true_modules, progress=False)
    assert right["modules"] == 3 and right["Q"]["z"] > 2 and right["Q"]["p"] < 0.05
    found = graph.modularity(weight="data", n_null=100, seed=0, progress=False)
    assert right["Q"]["value"] == pytest.approx(found["Q"]["value"])        # the rule finds the planted ones
    names = sorted(truth)
    across = [{n for n in names if n.startswith(f"L{layer}.")} for layer in range(3)]   # layers, not modules
    assert all(across)
    wrong = graph.modularity(weight="data", n_null=100, seed=0, modules=across, progress=False)
    assert wrong["Q"]["value"] < right["Q"]["value"] and wrong["Q"]["z"] < right["Q"]["z"]
    cap = graph.capacity_graph("data")
    label = {n: i for i, m in enumerate(true_modules) for n in m}
    total = sum(c for _, _, c in cap.edges(data="capacity"))
    cross = sum(c for u, v, c in cap.edges(data="capacity") if label.get(u, u) != label.get(v, v))
    assert right["crossing"]["value"] == pytest.approx(cross / total)
    with pytest.raises(ValueError, match="overlap"):
        graph.modularity(n_null=2, modules=[{names[0], names[1]}, {names[1]}], progress=False)
    with pytest.raises(ValueError, match="unknown"):
        graph.modularity(n_null=2, modules=[{"L9.H9"}], progress=False)


def test_rotation_null_runs_on_static_strengths(planted):
    *_, graph = planted
    result = graph.modularity(weight="static", null="rotate", n_null=20, seed=0, progress=False)
    assert result["null"] == "rotate" and 0 < result["Q"]["p"] <= 1
    with pytest.raises(ValueError, match="static"):
        graph.modularity(weight="data", null="rotate", n_null=2, progress=False)


def test_lesion_and_route_check_run_and_leave_no_hooks(planted):
    model, _, _, tokens, _, graph = planted
    lesion = graph.lesion(model, tokens[:16], n_random=2)
    assert lesion["n_cross_routes"] > 0 and len(lesion["random"]) == 2
    assert count_hooks(model) == 0
    check = graph.check_routes(model, tokens[:16], n=10)
    assert len(check["actual"]) == 10 and count_hooks(model) == 0


def test_static_strengths_against_transformer_lens_composition_scores(planted):
    """Report the rank agreement with TransformerLens' weight-only composition scores."""
    model, *_, graph = planted
    strengths = graph.routes("static")
    rows = []
    for mode in ("Q", "K", "V"):
        scores = model.all_composition_scores(mode)        # [L, H, L, H]
        for (w, p), s in strengths.items():
            reader, _, path = p.partition(":")
            if path == mode.lower() and graph.nx.nodes[w]["kind"] == "head":
                lw, hw = graph.nx.nodes[w]["layer"], graph.nx.nodes[w]["head"]
                lr, hr = graph.nx.nodes[reader]["layer"], graph.nx.nodes[reader]["head"]
                rows.append((s, float(scores[lw, hw, lr, hr].detach())))
    rho = spearman([r[0] for r in rows], [r[1] for r in rows])
    print(f"Spearman(static strength, all_composition_scores) = {rho:.3f} over {len(rows)} head pairs")
    assert len(rows) == 3 * 27 and rho > 0.3


def test_data_strengths_agree_with_real_ablation_on_bundled_model():
    model = tlm.toy.load_model()
    tokens, mask, scored = tlm.toy.mixed_tokens(n_per_task=16, scored=True)
    comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
    graph = tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored,
                            metric="logit", progress=False)
    check = graph.check_routes(model, tokens, attention_mask=mask, loss_mask=scored, n=50, seed=0)
    assert len(check["routes"]) == 50
    assert check["spearman"] >= 0.8, check["spearman"]
    assert count_hooks(model) == 0


# --- files and bad input ---------------------------------------------------------------------------

def test_save_load_and_exports(planted, tmp_path):
    model, *_, comp, graph = planted
    graph.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert meta["schema"] == "tl_modular.ChannelGraph" and meta["version"] == 1
    loaded = tlm.ChannelGraph.load(tmp_path / "g", compression=comp)
    assert loaded.routes("data") == graph.routes("data")
    assert loaded.modules() == graph.modules()
    assert loaded.nx.nodes["unembed"]["order"] == math.inf
    graphml = loaded.to_graphml(tmp_path / "g.graphml")
    assert set(nx.read_graphml(graphml).nodes) == set(graph.nx.nodes)
    dot = loaded.to_dot(tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph") and "cluster_2" in dot and '"L0.H0" -> "L0.MLP"' in dot
    ax = loaded.plot(tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 10_000 and ax is not None
    with pytest.raises(ValueError, match="no data strengths"):
        tlm.build_graph(comp).routes("data")


def test_bad_input_is_refused(planted):
    model, _, _, tokens, comp, _ = planted
    with pytest.raises(ValueError, match="model="):
        tlm.build_graph(comp, tokens=tokens)
    other = tiny_model("no_norm", n_layers=3, d_model=48)
    with pytest.raises(ValueError, match="another model"):
        tlm.build_graph(comp, model=other)
    with pytest.raises(ValueError, match="loss_mask"):
        tlm.build_graph(comp, model=model, tokens=tokens, loss_mask=torch.zeros_like(tokens), progress=False)
    with pytest.raises(ValueError, match="n_ctx"):
        tlm.build_graph(comp, model=model, tokens=torch.zeros(2, 64, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="metric"):
        tlm.build_graph(comp, model=model, tokens=tokens[:2], metric="accuracy", progress=False)
    assert count_hooks(model) == 0
    static = tlm.build_graph(comp)                       # weights only: no model, no embed/unembed
    assert static.weight == "static" and "unembed" not in static.nx and len(static.modules()) >= 1
