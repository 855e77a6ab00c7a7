"""Feature circuits per category (``tlm.attribution.aggregate``): shares against a dense influence
computed independently, circuits against the pruned graphs, shared/specific/similarity set algebra,
clusters that separate tasks, the induction circuit's ground truth, files and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular.attribution import AttributionSet, aggregate, feature_name, prune
from tl_modular.errors import ArtifactError


@pytest.fixture(scope="module")
def model(one_thread):
    return toy.load_model()


@pytest.fixture(scope="module")
def graphs(model):
    """Eight prompts of three tasks each, over a rank-8 compression fitted on the three tasks' prompts."""
    tasks = {"induction": toy.induction, "sorting": toy.sorting, "modular_addition": toy.modular_addition}
    tokens, mask = toy.mixed_tokens({n: make(24, seed=0) for n, make in tasks.items()}, n_per_task=24)
    comp = tlm.compress(model, tokens, attention_mask=mask, progress=False).truncated(rank=8)
    return {name: tlm.attribution_graph(model, make(8, seed=7), units=comp) for name, make in tasks.items()}


@pytest.fixture(scope="module")
def features(graphs):
    return aggregate(graphs, node_threshold=0.8, min_frequency=0.5)


def _dense_shares(graph):
    """Each feature's share, from a dense ``(I - Â)⁻¹`` of the row-normalised |adjacency|."""
    a = graph.dense().abs()
    a = a / a.sum(1, keepdim=True).clamp_min(1e-300)
    e = torch.zeros(len(graph), dtype=a.dtype)
    e[graph.logit] = 1
    infl = e @ torch.linalg.inv(torch.eye(len(graph), dtype=a.dtype) - a) - e
    out = {}
    for n, v in zip(graph.nodes, (infl / infl.sum()).tolist(), strict=True):
        if n.kind == "feature":
            key = n.name.rsplit("@", 1)[0]
            out[key] = out.get(key, 0.0) + v
    return out


def test_shares_and_circuits_against_independent_computations(graphs, features):
    assert list(features) == list(graphs)
    col = {f: j for j, f in enumerate(features.features)}
    for name, gs in graphs.items():
        c = features[name]
        assert c.n_examples == len(gs) and c.usage.shape == (len(gs), len(features.features))
        for row, g in enumerate(gs[:2]):                                # dense inverses: two per task
            dense = _dense_shares(g)
            got = {f: c.usage[row, col[f]] for f in dense}
            assert max(abs(got[f] - v) for f, v in dense.items()) < 1e-9
            assert c.usage[row].sum() == pytest.approx(sum(dense.values()), abs=1e-9) and c.usage[row].sum() <= 1
        # a feature is in the circuit iff the pruned graphs of at least half the prompts keep it
        kept = [set(prune(g, node_threshold=0.8, edge_threshold=1.0).features()) for g in gs]
        kept = [{k.rsplit("@", 1)[0] for k in s} for s in kept]
        expect = {f for f in features.features if sum(f in s for s in kept) >= 0.5 * len(gs)}
        assert set(c.features) == expect and c.features
        shares = [c.share[f] for f in c.features]
        assert shares == sorted(shares, reverse=True)                   # strongest first
        assert all(c.share[f] == pytest.approx(c.usage[:, col[f]].mean()) for f in c.features)
        # edges only among the circuit's features and into the logit, weights summed over positions
        inside = set(c.features) | {"logit"}
        assert c.edges and all(s in inside and t in inside and 0 < fr <= 1 for s, t, _, fr in c.edges)
        assert 0 <= c.error_share < 1


def test_edges_sum_the_graphs_edges_over_positions(graphs, features):
    name = "sorting"
    c = features[name]
    s, t, w, _ = c.edges[0]
    total = 0.0
    for g in graphs[name]:
        kept = prune(g, node_threshold=0.8, edge_threshold=1.0)
        a = g.adjacency.coalesce()
        for (ti, si), v in zip(a.indices()[:, kept.edges].T.tolist(), a.values()[kept.edges].tolist(), strict=True):
            sn, tn = g.nodes[si], g.nodes[ti]
            if sn.kind == "feature" and feature_name(sn) == s and (
                    (t == "logit" and tn.kind == "logit") or (tn.kind == "feature" and feature_name(tn) == t)):
                total += v
    assert w == pytest.approx(total / len(graphs[name]), rel=1e-9)


def test_shared_specific_similarity_and_clusters(features):
    names = list(features)
    sets = {n: set(features[n].features) for n in names}
    assert features.shared() == set.intersection(*sets.values())
    for n, only in features.specific().items():
        assert only <= sets[n] and not only & set().union(*(sets[o] for o in names if o != n))
    got, jac = features.similarity()
    assert got == names and np.allclose(np.diag(jac), 1) and np.allclose(jac, jac.T)
    a, b = sets[names[0]], sets[names[1]]
    assert jac[0, 1] == pytest.approx(len(a & b) / len(a | b))
    _, cos = features.similarity("cosine")
    assert np.allclose(np.diag(cos), 1) and (cos <= 1 + 1e-12).all()
    # prompts of different tasks use different features: the clusters are the tasks (measured purity
    # 1.0, ARI 1.0 here; at rank 4 the addition prompts split, 0.88 / 0.68)
    clusters = features.example_clusters()
    assert clusters["k"] == 3 and clusters["purity"] >= 0.9 and clusters["ari"] >= 0.7


def test_induction_circuit_holds_the_previous_token_and_induction_heads(features):
    facts = toy.info()
    channels = {f.split(":")[0] for f in features["induction"].features}
    assert facts["heads"]["previous_token"] in channels
    assert channels & set(facts["induction_heads"])


def test_grouping_by_a_token_category(graphs):
    flat = [g for gs in graphs.values() for g in gs[:3]]
    by_task = aggregate(flat, by=lambda g: str(int(g.tokens[0])))     # each task's prompts open with its marker
    assert len(by_task) == 3 and sorted(c.n_examples for c in by_task.values()) == [3, 3, 3]
    single = aggregate(graphs["sorting"])
    assert list(single) == ["all"]
    pruned = aggregate({"sorting": [prune(g, node_threshold=0.8, edge_threshold=1.0) for g in graphs["sorting"]]})
    assert pruned["sorting"].features == single["all"].features


def test_save_and_load(features, tmp_path):
    features.save(tmp_path)
    back = AttributionSet.load(tmp_path)
    assert list(back) == list(features) and back.features == features.features
    for name in features:
        a, b = features[name], back[name]
        assert a.features == b.features and a.frequency == b.frequency and a.error_share == b.error_share
        assert np.allclose(a.usage, b.usage, atol=1e-8) and a.share == pytest.approx(b.share)
        assert [e[:2] for e in a.edges] == [e[:2] for e in b.edges]
    assert back.settings == {"node_threshold": 0.8, "min_frequency": 0.5}
    path = tmp_path / "attribution_set.json"
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="newer"):
        AttributionSet.load(tmp_path)
    doc["version"] = 1
    doc["categories"][0]["usage"] = doc["categories"][0]["usage"][:1]
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="usage has 1 rows"):
        AttributionSet.load(tmp_path)


def test_bad_input_is_refused(graphs):
    g = graphs["sorting"][0]
    with pytest.raises(TypeError, match="got one graph"):
        aggregate(g)
    with pytest.raises(ValueError, match="has no graphs"):
        aggregate({"sorting": []})
    with pytest.raises(TypeError, match="holds str"):
        aggregate({"sorting": ["x"]})
    with pytest.raises(ValueError, match="min_frequency"):
        aggregate([g], min_frequency=0)
    with pytest.raises(ValueError, match="already a mapping"):
        aggregate({"sorting": [g]}, by=str)
    with pytest.raises(ValueError, match="only feature nodes"):
        feature_name(g.nodes[g.logit])
    with pytest.raises(ValueError, match="kind must be"):
        aggregate([g]).similarity("euclid")
