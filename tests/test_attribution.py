"""Attribution graphs on the bundled toy model: completeness, edges against a brute-force Jacobian
of the frozen model, pruning, faithfulness by intervention, the induction path, files, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular._models import count_hooks, fingerprint
from tl_modular._names import act_name
from tl_modular.attribution import AttributionGraph, faithfulness, feature_masks, influence, prune, run_with_features
from tl_modular.errors import ArtifactError


@pytest.fixture(scope="module")
def model64(one_thread):
    # float64 so that completeness and the Jacobian check hold to ~1e-12, not to fp32 rounding
    return toy.load_model().to(torch.float64)


@pytest.fixture(scope="module")
def comp64(model64):
    return tlm.compress(model64, toy.induction(32, seed=0).clean, progress=False)


@pytest.fixture(scope="module")
def graph(model64, comp64):
    return tlm.attribution_graph(model64, toy.induction(1, seed=5), units=comp64)[0]


@pytest.fixture(scope="module")
def small(comp64):
    """Three directions per write side: the same arithmetic on a graph small enough for dense checks."""
    return comp64.truncated(rank=3)


@pytest.fixture(scope="module")
def graph_small(model64, small):
    return tlm.attribution_graph(model64, toy.induction(1, seed=5), units=small)[0]


def test_completeness_is_exact(graph, model64):
    # every feature and the logit: incoming edges + its constant = its value in the clean run
    assert graph.completeness() < 1e-10
    with torch.no_grad():
        logits = model64(graph.tokens[None])[0]
    t = graph.target
    expect = sum(float(logits[p, a] - logits[p, w]) for p, a, w in
                 zip(t["positions"], t["answers"], t["wrong_answers"], strict=True)) / len(t["positions"])
    assert float(graph.activation[graph.logit]) == pytest.approx(expect, rel=1e-12)
    kinds = set(graph.kinds())
    assert kinds == {"embed", "bias", "error", "feature", "logit"}   # rotary model: no pos_embed nodes
    assert count_hooks(model64) == 0


def test_completeness_on_float32(comp64):
    m = toy.load_model()
    comp = tlm.compress(m, toy.induction(32, seed=0).clean, progress=False)
    g = tlm.attribution_graph(m, toy.induction(1, seed=5), units=comp)[0]
    assert g.completeness() < 1e-5         # fp32 activations of the model, float64 arithmetic


def _frozen_jacobian(model, tokens, read_hook, value):
    """Jacobian of ``value(cache)`` w.r.t. a perturbation of the residual at ``read_hook`` in the
    model with patterns, LayerNorm scales and MLP gates frozen at the clean run (TransformerLens'
    own forward, through hooks): the direct effect of anything written before ``read_hook``."""
    names = lambda n: n.endswith(("hook_pattern", "hook_scale", "hook_pre", "hook_post"))  # noqa: E731
    _, clean = model.run_with_cache(tokens, names_filter=names)
    gates = {}
    for layer in range(model.cfg.n_layers):
        pre, post = clean[act_name("pre", layer)], clean[act_name("post", layer)]
        gates[layer] = torch.where(pre != 0, post / torch.where(pre != 0, pre, 1.0), 0.0)

    def f(eps):
        store = {}
        hooks = [(read_hook, lambda x, hook: x + eps)]
        for name in clean:
            if name.endswith(("hook_pattern", "hook_scale")):
                hooks.append((name, lambda x, hook: clean[hook.name]))
        for layer in range(model.cfg.n_layers):
            hooks.append((act_name("post", layer),
                          lambda x, hook: store[act_name("pre", hook.layer())] * gates[hook.layer()]))
            hooks.append((act_name("pre", layer), lambda x, hook: store.__setitem__(hook.name, x)))
        for layer in range(model.cfg.n_layers):
            hooks.append((act_name("z", layer), lambda x, hook: store.__setitem__(hook.name, x)))
            hooks.append((act_name("mlp_out", layer), lambda x, hook: store.__setitem__(hook.name, x)))
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        return value(store, logits[0])

    eps = torch.zeros(tokens.shape[1], model.cfg.d_model, dtype=torch.float64)
    return torch.func.jacrev(f)(eps)             # [*value_shape, pos, d_model]


@pytest.mark.parametrize("channel", ["L1.H1", "L1.MLP", "logit"])
def test_edges_equal_the_jacobian_of_the_frozen_model(graph_small, model64, small, channel):
    graph, comp64 = graph_small, small
    tokens = graph.tokens[None]
    n_layers = model64.cfg.n_layers
    if channel == "logit":
        read, stream = f"blocks.{n_layers - 1}.hook_resid_post", 2 * n_layers
        t = graph.target
        value = lambda s, lg: sum(lg[p, a] - lg[p, w] for p, a, w in zip(  # noqa: E731
            t["positions"], t["answers"], t["wrong_answers"], strict=True))[None] / len(t["positions"])
        targets = [graph.logit]
    else:
        name = tlm.segment(model64)[channel]
        side = comp64[channel].write
        w_o = model64.blocks[name.layer].attn.W_O[name.head] if name.kind == "head" else None
        if name.kind == "head":
            read, stream = f"blocks.{name.layer}.hook_resid_pre", 2 * name.layer
            value = lambda s, lg: ((s[act_name("z", 1)][0, :, name.head] @ w_o - side.mean) @ side.encoder)  # noqa: E731
        else:
            read, stream = f"blocks.{name.layer}.hook_resid_mid", 2 * name.layer + 1
            value = lambda s, lg: (s[act_name("mlp_out", 1)][0] - side.mean) @ side.encoder  # noqa: E731
        targets = [graph.index(f"{channel}:write.d{j}@{p}") for p in range(len(graph.tokens)) for j in range(side.rank)]
    jac = _frozen_jacobian(model64, tokens, read, value).reshape(len(targets), len(graph.tokens), -1)
    # expected edge s -> t: the write of s (its activation times its direction) dotted with dt/dresid
    sources = [i for i, n in enumerate(graph.nodes) if n.kind != "logit" and n.stream <= stream]
    rows = graph.adjacency.index_select(0, torch.tensor(targets)).to_dense()
    got = rows[:, sources]
    writes = _writes(graph, model64, comp64)[sources]                 # [n_src, d_model]
    pos = torch.tensor([graph.nodes[i].position for i in sources])
    expect = torch.einsum("tsd,sd->ts", jac[:, pos], writes)
    assert (got - expect).abs().max() <= 1e-9 * expect.abs().max()
    # and nothing written after the read point has an edge into these targets
    later = [i for i, n in enumerate(graph.nodes) if n.stream > stream and n.kind != "logit"]
    assert not rows[:, later].any()


def _writes(graph, model, comp):
    """Each node's write into the residual stream, recomputed from a fresh cache."""
    channels = tlm.segment(model)
    _, cache = channels.run_with_cache(graph.tokens[None])
    parts = channels.contributions(cache)[:, 0]
    out = torch.zeros(len(graph.nodes) - 1, model.cfg.d_model, dtype=torch.float64)
    for i, n in enumerate(graph.nodes[:-1]):
        if n.kind == "embed":
            out[i] = parts[channels.index("embed"), n.position]
        elif n.kind == "feature":
            out[i] = graph.activation[i] * comp[n.channel].write.decoder[:, n.index]
        elif n.kind == "error":
            side = comp[n.channel].write
            w = parts[channels.index(n.channel), n.position]
            out[i] = w - side.mean - ((w - side.mean) @ side.encoder) @ side.decoder.T
        elif n.kind == "bias":
            layer, attn = (n.stream - 1) // 2, n.stream % 2 == 1
            names = ([c.name for c in channels.in_layer(layer) if c.kind == "head"] + [f"L{layer}.b_O"]
                     if attn else [f"L{layer}.MLP"])
            out[i] = sum(comp[c].write.mean if c in comp else parts[channels.index(c), n.position] for c in names)
    return out


def test_pruning_is_monotone_and_influence_is_a_series(graph_small):
    graph = graph_small
    infl = influence(graph)
    assert infl[graph.logit] == 0 and (infl >= 0).all()
    kept = [prune(graph, edge_threshold=t) for t in (0.5, 0.8, 0.95, 1.0)]
    for small, big in zip(kept, kept[1:], strict=False):
        assert (small.edges <= big.edges).all() and (small.nodes <= big.nodes).all()
        assert small.n_edges < big.n_edges
    nodes = [prune(graph, node_threshold=t, edge_threshold=1.0).nodes for t in (0.3, 0.6, 0.9)]
    assert all((a <= b).all() for a, b in zip(nodes, nodes[1:], strict=False))
    # influence against a dense (I - Â)⁻¹ on the same normalised matrix
    a = graph.dense().abs()
    a = a / a.sum(1, keepdim=True).clamp_min(1e-300)
    e = torch.zeros(len(graph), dtype=torch.float64)
    e[graph.logit] = 1
    dense = e @ torch.linalg.inv(torch.eye(len(graph), dtype=torch.float64) - a) - e
    assert torch.allclose(infl, dense, atol=1e-10)


def test_intervention_recovers_the_metric_better_than_random(model64, comp64):
    task = toy.induction(4, seed=11)
    before = fingerprint(model64)
    graphs = tlm.attribution_graph(model64, task, units=comp64)
    kept = [prune(g, edge_threshold=0.9) for g in graphs]
    result = faithfulness(model64, task, comp64, kept, n_random=3)
    assert result["faithfulness"] >= 0.9
    assert max(result["random"]) < 0.2
    # the whole graph kept is the clean run exactly; nothing kept is the ablated run
    full = faithfulness(model64, task, comp64, [prune(g, node_threshold=1.0, edge_threshold=1.0) for g in graphs])
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    assert count_hooks(model64) == 0 and fingerprint(model64) == before


def test_previous_token_head_reaches_the_induction_heads(model64, graph):
    facts = toy.info()
    prev, induction = facts["heads"]["previous_token"], facts["induction_heads"]
    kept = prune(graph, edge_threshold=0.9)
    a = graph.adjacency.coalesce()
    edges = a.indices()[:, kept.edges]
    # among layer-0 heads the previous-token head carries the most influence on the logit
    infl = influence(graph)
    per_head = {c.name: float(sum(infl[i] for i, n in enumerate(graph.nodes) if n.channel == c.name))
                for c in tlm.segment(model64).of_kind("head") if c.layer == 0}
    assert max(per_head, key=per_head.get) == prev
    # a kept path previous-token head -> (MLP0) -> an induction head's features -> logit
    import networkx as nx

    g = nx.DiGraph()
    g.add_edges_from((int(s), int(t)) for t, s in edges.T.tolist())
    starts = [i for i, n in enumerate(graph.nodes) if n.channel == prev and kept.nodes[i] and i in g]
    ends = {i for i, n in enumerate(graph.nodes) if n.channel in induction and kept.nodes[i]}
    reach = set().union(*(nx.descendants(g, s) for s in starts))
    assert reach & ends and graph.logit in reach


def test_save_load_and_networkx(graph_small, tmp_path):
    graph = graph_small
    path = graph.save(tmp_path / "graph.json")
    back = AttributionGraph.load(path)
    assert back.nodes == graph.nodes and torch.equal(back.tokens, graph.tokens)
    assert torch.allclose(back.dense(), graph.dense()) and back.completeness() < 1e-10
    kept = prune(graph, edge_threshold=0.8)
    small = AttributionGraph.load(graph.save(tmp_path / "kept.json", pruned=kept))
    assert small.adjacency._nnz() == kept.n_edges
    nxg = graph.to_networkx()
    assert nxg.number_of_nodes() == len(graph) and nxg.number_of_edges() == graph.adjacency._nnz()
    doc = json.loads(path.read_text())
    doc["version"] = 99
    (tmp_path / "new.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="newer"):
        AttributionGraph.load(tmp_path / "new.json")
    (tmp_path / "cut.json").write_text(path.read_text()[:100])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        AttributionGraph.load(tmp_path / "cut.json")


def test_bad_input_is_refused(model64, comp64, graph):
    task = toy.induction(2, seed=0)
    with pytest.raises(TypeError, match="units must be a tlm.Compression"):
        tlm.attribution_graph(model64, task, units="L0.H0")
    with pytest.raises(ValueError, match="target is required"):
        tlm.attribution_graph(model64, task.clean, units=comp64)
    with pytest.raises(ValueError, match="target positions must lie in"):
        tlm.attribution_graph(model64, task.clean[0], units=comp64, target={"positions": [99], "answers": [1]})
    with pytest.raises(ValueError, match="token ids"):
        tlm.attribution_graph(model64, task.clean[0], units=comp64, target={"positions": [3], "answers": [10**6]})
    with pytest.raises(TypeError, match="integer tensor"):
        tlm.attribution_graph(model64, task.clean.float(), units=comp64, target={"positions": [3], "answers": [1]})
    with pytest.raises(ValueError, match="edge_threshold"):
        prune(graph, edge_threshold=1.5)
    with pytest.raises(ValueError, match="baseline"):
        faithfulness(model64, toy.induction(1, seed=5), comp64, [prune(graph)], baseline="zero")
    with pytest.raises(ValueError, match="one graph per prompt"):
        faithfulness(model64, task, comp64, [prune(graph)])
    masks = feature_masks(model64, [prune(graph)], comp64)
    masks["L1.MLP"] = masks["L1.MLP"][:, :3]
    with pytest.raises(ValueError, match=r"masks\['L1.MLP'\] must be \[batch, pos, features\]"):
        faithfulness(model64, toy.induction(1, seed=5), comp64, masks)
    assert count_hooks(model64) == 0


def test_no_hook_left_when_a_hook_raises(model64, comp64, graph):
    masks = feature_masks(model64, [prune(graph)], comp64)
    base = {n: torch.zeros_like(m, dtype=torch.float64) for n, m in masks.items()}
    base["L1.H3"] = base["L1.H3"][..., :1].expand(-1, -1, 5).clone()[..., :1].squeeze(-1)  # wrong shape
    with pytest.raises(ValueError, match=r"base\['L1.H3'\]"):
        run_with_features(model64, comp64, graph.tokens[None], masks, base)
    good = {n: torch.zeros_like(m, dtype=torch.float64) for n, m in masks.items()}
    bad = dict(masks, **{"L1.MLP": masks["L1.MLP"].to(torch.float64)})   # torch.where refuses a float mask
    with pytest.raises(RuntimeError):
        run_with_features(model64, comp64, graph.tokens[None], bad, good)
    assert count_hooks(model64) == 0


@pytest.fixture(scope="module")
def mlp_saes(model64):
    return [s.to(torch.float64) for h, s in tlm.sae.bundled(model64).items() if h.endswith("hook_mlp_out")]


def test_sae_features_as_nodes(model64, comp64, mlp_saes):
    units = [comp64, *mlp_saes]
    task = toy.induction(1, seed=5)
    g = tlm.attribution_graph(model64, task, units=units)[0]
    assert g.completeness() < 1e-10
    feats = [i for i, n in enumerate(g.nodes) if n.sae is not None]
    assert feats and all(g.activation[i] > 0 for i in feats)             # only active features are nodes
    assert all(g.nodes[i].name.startswith("sae:blocks.") for i in feats)
    # the pre-activation of the SAE features of L1.MLP against the frozen model's Jacobian
    sae = mlp_saes[1]
    targets = [i for i in feats if g.nodes[i].channel == "L1.MLP"]
    pos = torch.tensor([g.nodes[i].position for i in targets])
    idx = torch.tensor([g.nodes[i].index for i in targets])

    def value(store, logits):
        pre = (store[act_name("mlp_out", 1)][0] - sae.b_dec) @ sae.W_enc + sae.b_enc
        return pre[pos, idx]

    jac = _frozen_jacobian(model64, g.tokens[None], "blocks.1.hook_resid_mid", value)
    sources = [i for i, n in enumerate(g.nodes) if n.kind != "logit" and n.stream <= 3]
    got = g.adjacency.index_select(0, torch.tensor(targets)).to_dense()[:, sources]
    writes = torch.zeros(len(sources), model64.cfg.d_model, dtype=torch.float64)   # from a fresh cache
    channels = tlm.segment(model64)
    _, cache = channels.run_with_cache(g.tokens[None])
    parts = channels.contributions(cache)[:, 0]
    sae0 = mlp_saes[0]
    for k, i in enumerate(sources):
        n = g.nodes[i]
        if n.kind == "embed":
            writes[k] = parts[channels.index("embed"), n.position]
        elif n.kind == "feature" and n.sae is not None:
            writes[k] = g.activation[i] * sae0.W_dec[n.index]
        elif n.kind == "feature":
            writes[k] = g.activation[i] * comp64[n.channel].write.decoder[:, n.index]
        elif n.kind == "error" and n.channel == "L0.MLP":
            w = parts[channels.index("L0.MLP"), n.position]
            writes[k] = w - sae0.decode(sae0.encode(w[None]))[0]
        elif n.kind == "error":
            side = comp64[n.channel].write
            w = parts[channels.index(n.channel), n.position]
            writes[k] = w - side.mean - ((w - side.mean) @ side.encoder) @ side.decoder.T
        elif n.kind == "bias" and n.stream in (1, 3):
            layer = n.stream // 2
            writes[k] = sum(comp64[c.name].write.mean for c in channels.in_layer(layer) if c.kind == "head") \
                + parts[channels.index(f"L{layer}.b_O"), n.position]
        elif n.kind == "bias":
            writes[k] = sae0.b_dec
    spos = torch.tensor([g.nodes[i].position for i in sources])
    expect = torch.einsum("tsd,sd->ts", jac[:, spos], writes)
    assert (got - expect).abs().max() <= 1e-9 * expect.abs().max()
    # intervention with SAE units: the pruned graph recovers the metric, random sets do not
    task = toy.induction(3, seed=11)
    kept = [prune(x, edge_threshold=0.9) for x in tlm.attribution_graph(model64, task, units=units)]
    result = faithfulness(model64, task, units, kept, n_random=2)
    assert result["faithfulness"] >= 0.8 and max(result["random"]) < 0.3
    assert count_hooks(model64) == 0


def test_the_whole_graph_scores_one_with_sae_units_and_the_error_nodes_frozen(model64, comp64, mlp_saes):
    units = [comp64, *mlp_saes]
    task = toy.induction(3, seed=11)
    kept = [prune(x, node_threshold=1.0, edge_threshold=1.0) for x in tlm.attribution_graph(model64, task, units=units)]
    # (inactive="ablate" would also set the SAE features that are no nodes of the graphs: not the whole graph)
    for baseline in ("mean", "corrupted"):
        got = faithfulness(model64, task, units, kept, baseline=baseline, n_random=1)
        assert got["faithfulness"] == pytest.approx(1.0, abs=1e-9) and got["random"][0] < 0.9
    assert count_hooks(model64) == 0


def test_bad_units_are_refused(model64, mlp_saes):
    resid = [s for h, s in tlm.sae.bundled(model64).items() if h.endswith("hook_resid_mid")][0]
    task = toy.induction(1, seed=0)
    with pytest.raises(ValueError, match="SAE units must read an MLP's output"):
        tlm.attribution_graph(model64, task, units=resid)
    with pytest.raises(ValueError, match="two SAEs on 'blocks.0.hook_mlp_out'"):
        tlm.attribution_graph(model64, task, units=[mlp_saes[0], mlp_saes[0]])


def test_key_scores_split_exactly_and_the_previous_token_head_feeds_the_induction_keys(model64, graph):
    from tl_modular.attribution import key_attribution, key_contributions

    facts = toy.info()
    prev, induction = facts["heads"]["previous_token"], facts["induction_heads"]
    # every clean score of an induction head = the sources' key contributions at its key + a constant
    name = tlm.segment(model64)[induction[0]]
    sources, contrib, const = key_contributions(model64, graph, induction[0])
    with torch.no_grad():
        _, cache = model64.run_with_cache(graph.tokens[None])
    scores = cache[act_name("attn_scores", name.layer)][0, name.head]
    pos = torch.tensor([graph.nodes[i].position for i in sources.tolist()])
    split = torch.stack([contrib[:, pos == k].sum(1) for k in range(len(graph.tokens))], 1) + const
    causal = torch.tril(torch.ones_like(scores, dtype=torch.bool))
    assert torch.allclose(split[causal], scores[causal], atol=1e-10)
    # key attribution = d metric / d eps of adding eps * (a source's rotated key) to hook_rot_k
    key = key_attribution(model64, graph, heads=[induction[0]])
    assert not any(p.grad is not None for p in model64.parameters())
    top = sources[contrib.abs().sum(0).argsort(descending=True)[:3]]
    rot = _rotated_keys(model64, graph, induction[0], top)
    t = graph.target
    for i, k_s in zip(top.tolist(), rot, strict=True):
        p = graph.nodes[i].position

        def metric(eps, p=p, k_s=k_s):
            def add(x, hook):
                x = x.clone()
                x[0, p, name.head] = x[0, p, name.head] + eps * k_s
                return x
            lg = model64.run_with_hooks(graph.tokens[None], fwd_hooks=[(act_name("rot_k", name.layer), add)])[0]
            return sum(lg[q, a] - lg[q, w] for q, a, w in
                       zip(t["positions"], t["answers"], t["wrong_answers"], strict=True)) / len(t["positions"])

        zero, one = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
        _, d = torch.func.jvp(metric, (zero,), (one,))
        assert float(key[i]) == pytest.approx(float(d.detach()), rel=1e-8, abs=1e-12)
    # ground truth: of the layer-0 channels, the previous-token head contributes most through the
    # induction heads' keys (the K-composition the frozen-attention edges cannot show), then MLP0
    key = key_attribution(model64, graph, heads=induction)
    per = {}
    for n, v in zip(graph.nodes, key.tolist(), strict=True):
        if n.channel is not None and n.channel.startswith("L0."):
            per[n.channel] = per.get(n.channel, 0.0) + v
    ranked = sorted(per, key=per.get, reverse=True)
    assert ranked[0] == prev and ranked[1] == "L0.MLP"
    assert count_hooks(model64) == 0


def _rotated_keys(model, graph, head, sources):
    """Each source's key vector, rotated at its position, computed through TransformerLens' own
    rotary (``apply_rotary`` on a batch holding the vector at its position)."""
    name = tlm.segment(model)[head]
    attn = model.blocks[name.layer].attn
    with torch.no_grad():
        _, cache = model.run_with_cache(graph.tokens[None])
    sigma = cache[f"blocks.{name.layer}.ln1.hook_scale"][0, :, 0]
    out = []
    for i in sources.tolist():
        p = graph.nodes[i].position
        w = graph.writes[i]
        k = ((w - w.mean()) * model.blocks[name.layer].ln1.w / sigma[p]) @ attn.W_K[name.head]
        x = torch.zeros(1, len(graph.tokens), 1, model.cfg.d_head, dtype=torch.float64)
        x[0, p, 0] = k
        out.append(attn.apply_rotary(x, 0)[0, p, 0].detach())
    return out


def _pruned_by_hand(full: AttributionGraph, min_influence: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An independent pruned build from the full graph: targets decided from the logit backwards
    by stream point (influence as a series over the edges of the kept targets), then each dropped
    feature's column summed into its error node's and its row and column removed. Returns the kept
    mask, the dense adjacency and the edge pattern (an edge where any folded part was one)."""
    a = full.dense()
    n = len(full)
    stream = torch.tensor([nd.stream for nd in full.nodes])
    feature = full.mask("feature")
    infl = torch.zeros(n, dtype=a.dtype)
    infl[full.logit] = 1.0
    decided = torch.zeros(n, dtype=torch.bool)
    for s in sorted(set(stream.tolist()), reverse=True):
        t = ((stream == s) & (feature | (torch.arange(n) == full.logit)) & (infl >= min_influence)).nonzero()[:, 0]
        decided[t] = True
        w = a[t].abs()
        infl += (infl[t] / w.sum(1).clamp_min(1e-300)) @ w
    near = (infl[feature] - min_influence).abs() / min_influence
    assert (near > 1e-6).all()                                    # no feature on the edge of the threshold
    dropped = feature & ~decided
    error = {(nd.channel, nd.position): i for i, nd in enumerate(full.nodes) if nd.kind == "error"}
    into = torch.arange(n)
    for i in dropped.nonzero()[:, 0].tolist():
        into[i] = error[(full.nodes[i].channel, full.nodes[i].position)]
    folded = torch.zeros_like(a).index_add_(1, into, a)
    pattern = torch.zeros_like(a).index_add_(1, into, (a != 0).to(a.dtype)) != 0
    keep = ~dropped
    return keep, folded[keep][:, keep], pattern[keep][:, keep]


@pytest.mark.parametrize("units", ["directions", "saes"])
@pytest.mark.parametrize("min_influence", [1e-3, 1e-2])
def test_pruned_build_holds_only_its_graph_and_equals_a_fold_by_hand(model64, small, mlp_saes, units, min_influence):
    """A pruned build folds its dropped features as it goes (issue 23): it holds no more edges than
    its graph, and its graph equals the full graph pruned and folded by hand."""
    u = small if units == "directions" else [small, *mlp_saes]
    task = toy.induction(1, seed=5)
    full = tlm.attribution_graph(model64, task, units=u)[0]
    pruned = tlm.attribution_graph(model64, task, units=u, min_influence=min_influence)[0]
    keep, expect, pattern = _pruned_by_hand(full, min_influence)
    assert [nd.name for nd in pruned.nodes] == [nd.name for nd, k in zip(full.nodes, keep.tolist(), strict=True) if k]
    assert pruned.info["dropped_features"] == int((~keep).sum()) > 0
    assert pruned.info["edges_built"] == pruned.adjacency._nnz() < full.adjacency._nnz()
    idx = pruned.adjacency.indices()
    assert torch.equal(idx, pattern.nonzero().T)                  # the same edges, zeros of folded sums kept
    got = pruned.adjacency.values()
    want = expect[idx[0], idx[1]]
    error = torch.tensor([pruned.nodes[s].kind == "error" for s in idx[1].tolist()])
    assert torch.equal(got[~error], want[~error])                # bit for bit: no sum
    # an error node's edges are sums in another order: equal to rounding of the target's largest edge
    scale = full.dense()[keep].abs().max(1).values[idx[0][error]]
    assert ((got[error] - want[error]).abs() <= 1e-13 * scale).all()
    assert pruned.completeness() < 1e-10
