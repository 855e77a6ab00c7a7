"""Attribution graphs over transcoder features (sae-lens Transcoder / JumpReLUTranscoder replacing
the MLPs) on a tiny seeded model with tiny transcoders built in code: completeness, edges against
the Jacobian of the frozen model, steering against the graph's prediction, interventions, refusals;
and the pruned build (``min_influence``) against the full one."""

from __future__ import annotations

import pytest
import torch

import tl_modular as tlm
from tl_modular._models import count_hooks
from tl_modular._names import act_name
from tl_modular.attribution import feature_masks, influence, prune
from tl_modular.testing import tiny_model

N_POS = 8
TARGET = {"positions": [N_POS - 1], "answers": [3], "wrong_answers": [5]}


@pytest.fixture(scope="module")
def model(one_thread):
    return tiny_model("gpt2", seed=3, dtype=torch.float64)


def _transcoder(model, layer, hook_in, *, jump=False, d_sae=40, seed=0):
    """A random transcoder with about a third of its features active on typical inputs."""
    from sae_lens import JumpReLUTranscoder, JumpReLUTranscoderConfig, Transcoder, TranscoderConfig

    d = model.cfg.d_model
    cfg_cls, cls = (JumpReLUTranscoderConfig, JumpReLUTranscoder) if jump else (TranscoderConfig, Transcoder)
    cfg = cfg_cls(d_in=d, d_sae=d_sae, d_out=d, apply_b_dec_to_input=False, dtype="float64")
    cfg.metadata.hook_name = hook_in
    cfg.metadata.hook_name_out = act_name("mlp_out", layer)
    tc = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(d, d_sae, generator=gen, dtype=torch.float64) / d ** 0.5)
        tc.b_enc.copy_(-0.3 + 0.1 * torch.randn(d_sae, generator=gen, dtype=torch.float64))
        tc.W_dec.copy_(0.2 * torch.randn(d_sae, d, generator=gen, dtype=torch.float64))
        tc.b_dec.copy_(0.05 * torch.randn(d, generator=gen, dtype=torch.float64))
        if jump:
            tc.threshold.copy_(0.05 * torch.rand(d_sae, generator=gen, dtype=torch.float64))
    return tc.eval()


@pytest.fixture(scope="module")
def transcoders(model):
    # layer 0 reads the normalised input (as circuit-tracer's), layer 1 the residual itself, with JumpReLU
    return [_transcoder(model, 0, act_name("normalized", 0, "ln2"), seed=1),
            _transcoder(model, 1, act_name("resid_mid", 1), jump=True, seed=2)]


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (N_POS,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def graph(model, transcoders, tokens):
    return tlm.attribution_graph(model, tokens, units=transcoders, target=TARGET)


def _inputs(model, tokens, tc):
    _, cache = model.run_with_cache(tokens[None])
    return cache[tc.cfg.metadata.hook_name][0], cache[tc.cfg.metadata.hook_name_out][0]


def test_transcoder_nodes_are_complete_and_match_sae_lens(model, transcoders, tokens, graph):
    assert graph.completeness() < 1e-10
    assert set(graph.info["transcoders"]) == {"L0.MLP", "L1.MLP"}
    assert graph.info["transcoders"]["L1.MLP"]["architecture"] == "jumprelu_transcoder"
    for layer, tc in enumerate(transcoders):
        x, mlp_out = _inputs(model, tokens, tc)
        with torch.no_grad():
            expect = tc.encode(x)                               # sae-lens' own encoder: [pos, d_sae]
            recon = tc.decode(expect)
        nodes = [(i, n) for i, n in enumerate(graph.nodes) if n.kind == "feature" and n.channel == f"L{layer}.MLP"]
        assert 0 < len(nodes) < expect.numel()                 # only active features are nodes
        assert int((expect != 0).sum()) == len(nodes)
        for i, n in nodes:
            assert n.sae == tc.cfg.metadata.hook_name
            assert float(graph.activation[i]) == pytest.approx(float(expect[n.position, n.index]), rel=1e-12)
        # the MLP's error node is its true output minus the transcoder's
        for p in range(N_POS):
            err = graph.writes[graph.index(f"L{layer}.MLP:error@{p}")]
            assert torch.allclose(err, mlp_out[p] - recon[p], atol=1e-12)
    assert count_hooks(model) == 0


def _frozen(model, tokens, read_hook, eps, value):
    """``value(store)`` with ``eps`` added at ``read_hook`` in the model with every LayerNorm scale,
    attention output and MLP output frozen at the clean run except ``value``'s own reads."""
    _, clean = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_scale"))
    store = {}
    hooks = [(read_hook, lambda x, hook: x + eps)]
    hooks += [(name, lambda x, hook: clean[hook.name]) for name in clean]
    hooks += [(act_name("normalized", layer, "ln2"), lambda x, hook: store.__setitem__(hook.name, x))
              for layer in range(model.cfg.n_layers)]
    hooks += [(act_name("resid_mid", layer), lambda x, hook: store.__setitem__(hook.name, x))
              for layer in range(model.cfg.n_layers)]
    model.run_with_hooks(tokens, fwd_hooks=hooks)
    return value(store)


@pytest.mark.parametrize("layer", [0, 1])
def test_edges_into_transcoder_features_equal_the_frozen_jacobian(model, transcoders, tokens, graph, layer):
    tc = transcoders[layer]
    targets = [(i, n) for i, n in enumerate(graph.nodes) if n.kind == "feature" and n.channel == f"L{layer}.MLP"]
    pre = lambda s: s[tc.cfg.metadata.hook_name][0] @ tc.W_enc + tc.b_enc  # noqa: E731
    read = act_name("resid_mid", layer)
    eps = torch.zeros(N_POS, model.cfg.d_model, dtype=torch.float64)
    jac = torch.func.jacrev(lambda e: _frozen(model, tokens[None], read, e, pre))(eps)   # [pos, d_sae, pos, d]
    dense = graph.dense()
    sources = [i for i, n in enumerate(graph.nodes) if n.kind != "logit" and n.stream <= 2 * layer + 1]
    for i, n in targets:
        expect = torch.stack([jac[n.position, n.index, graph.nodes[s].position] @ graph.writes[s]
                              for s in sources]).detach()
        assert torch.allclose(dense[i, sources], expect, rtol=0, atol=1e-10 * float(expect.abs().max()))
        assert float(dense[i].sum() + graph.bias[i]) == pytest.approx(float(pre(_frozen(
            model, tokens[None], read, eps, lambda s: s))[n.position, n.index]), rel=1e-10)


def test_steering_a_transcoder_feature_moves_the_logit_as_the_graph_predicts(model, transcoders, tokens, graph):
    """In the local replacement model (patterns, scales, attention and error terms frozen, the
    MLPs replaced by their transcoders), adding δ to a feature's activation moves the logit by
    δ · [(I - M)⁻¹]_{logit, f}, M the edges divided by their source's activation."""
    n = len(graph)
    feature = graph.mask("feature")
    m = graph.dense() / torch.where(feature, graph.activation, 1.0)
    m[:, ~feature] = 0                                        # embeddings, errors, biases stay fixed
    total = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - m)[graph.logit]
    layer0 = [i for i, nd in enumerate(graph.nodes) if nd.kind == "feature" and nd.channel == "L0.MLP"]
    f = max(layer0, key=lambda i: abs(float(total[i])))
    node = graph.nodes[f]
    _, clean = model.run_with_cache(tokens[None])

    def logit(delta):
        def replace(x, hook):
            layer = hook.layer()
            tc = transcoders[layer]
            a = tc.encode(store[tc.cfg.metadata.hook_name])
            if layer == 0:
                a = a.clone()
                a[0, node.position, node.index] += delta
            return tc.decode(a) + (clean[hook.name] - tc.decode(tc.encode(clean[tc.cfg.metadata.hook_name])))

        store = {}
        hooks = [(name, lambda x, hook: clean[hook.name]) for name in clean if name.endswith(("hook_scale",
                                                                                              "hook_attn_out"))]
        hooks += [(tc.cfg.metadata.hook_name, lambda x, hook: store.__setitem__(hook.name, x)) for tc in transcoders]
        hooks += [(act_name("mlp_out", layer), replace) for layer in range(2)]
        out = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, N_POS - 1]
        return float(out[TARGET["answers"][0]] - out[TARGET["wrong_answers"][0]])

    with torch.no_grad():
        base = logit(0.0)
        assert base == pytest.approx(float(graph.activation[graph.logit]), rel=1e-10)
        for delta in (1e-3, -1e-3):
            assert logit(delta) - base == pytest.approx(delta * float(total[f]), rel=1e-6)
    assert count_hooks(model) == 0


def test_run_with_features_encodes_transcoders_from_the_mlp_input(model, transcoders, tokens, graph):
    """Setting one transcoder feature to a value through run_with_features equals adding the change
    times its decoder row to the MLP's output by hand; keeping everything is the clean run."""
    from tl_modular.attribution import run_with_features

    batch = tokens[None]
    masks = {name: torch.ones(1, N_POS, 40, dtype=torch.bool) for name in ("L0.MLP", "L1.MLP")}
    kept = feature_masks(model, [prune(graph, node_threshold=1.0, edge_threshold=1.0)], transcoders,
                         every_node=True)
    assert set(kept) == set(masks) and kept["L0.MLP"].any()
    x, _ = _inputs(model, tokens, transcoders[0])
    with torch.no_grad():
        acts = {"L0.MLP": transcoders[0].encode(x)[None], "L1.MLP": transcoders[1].encode(
            _inputs(model, tokens, transcoders[1])[0])[None]}
        clean = model(batch)
        assert torch.allclose(run_with_features(model, transcoders, batch, masks, acts), clean, atol=1e-12)
        p, j = 3, int(acts["L0.MLP"][0, 3].argmax())
        masks["L0.MLP"][0, p, j] = False
        base = {k: v.clone() for k, v in acts.items()}
        base["L0.MLP"][0, p, j] += 0.5
        got = run_with_features(model, transcoders, batch, masks, base)
        shift = lambda out, hook: out + torch.nn.functional.one_hot(torch.tensor(p), N_POS)[None, :, None] * (  # noqa: E731
            0.5 * transcoders[0].W_dec[j])
        expect = model.run_with_hooks(batch, fwd_hooks=[(act_name("mlp_out", 0), shift)])
    assert (got - clean).abs().max() > 1e-3
    assert torch.allclose(got, expect, atol=1e-10)
    assert count_hooks(model) == 0


def test_transcoders_the_graph_cannot_take_are_refused(model, transcoders, tokens):
    from sae_lens import SkipTranscoder, SkipTranscoderConfig

    d = model.cfg.d_model
    cfg = SkipTranscoderConfig(d_in=d, d_sae=8, d_out=d, apply_b_dec_to_input=False)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = act_name("normalized", 0, "ln2"), act_name("mlp_out", 0)
    with pytest.raises(ValueError, match="no skip connection"):
        tlm.attribution_graph(model, tokens, units=SkipTranscoder(cfg), target=TARGET)
    wrong_in = _transcoder(model, 1, act_name("resid_pre", 1))
    with pytest.raises(ValueError, match="must read that MLP's input"):
        tlm.attribution_graph(model, tokens, units=wrong_in, target=TARGET)
    wrong_out = _transcoder(model, 0, act_name("normalized", 0, "ln2"))
    wrong_out.cfg.metadata.hook_name_out = act_name("resid_post", 0)
    with pytest.raises(ValueError, match="must write an MLP's output"):
        tlm.attribution_graph(model, tokens, units=wrong_out, target=TARGET)
    with pytest.raises(ValueError, match="two SAEs or transcoders on L0.MLP"):
        tlm.attribution_graph(model, tokens, units=[transcoders[0], transcoders[0]], target=TARGET)
    with pytest.raises(ValueError, match="min_influence must be a number >= 0"):
        tlm.attribution_graph(model, tokens, units=transcoders, target=TARGET, min_influence=-1.0)


@pytest.fixture(scope="module")
def mixed_units(model, transcoders):
    """Write directions for the heads, transcoders for the MLPs."""
    comp = tlm.compress(model, torch.randint(0, 50, (32, N_POS), generator=torch.Generator().manual_seed(1)),
                        progress=False)
    return [comp, *transcoders]


@pytest.mark.parametrize("which", ["transcoders", "mixed"])
def test_pruned_build_keeps_the_full_builds_edges_and_completeness(model, transcoders, mixed_units, tokens, which):
    units = transcoders if which == "transcoders" else mixed_units
    full = tlm.attribution_graph(model, tokens, units=units, target=TARGET)
    same = tlm.attribution_graph(model, tokens, units=units, target=TARGET, min_influence=0.0)
    assert same.info["dropped_features"] == 0
    assert torch.equal(same.adjacency.indices(), full.adjacency.indices())
    assert torch.equal(same.adjacency.values(), full.adjacency.values())
    infl = influence(full)
    feature = full.mask("feature")
    x = float(infl[feature & (infl > 0)].median())
    pruned = tlm.attribution_graph(model, tokens, units=units, target=TARGET, min_influence=x)
    assert 0 < pruned.info["dropped_features"] < int(feature.sum())
    assert pruned.completeness() < 1e-10
    assert pruned.info["edges_built"] == pruned.adjacency._nnz()     # it held only its graph's edges
    # the kept features: those whose influence on the pruned graph reaches x (a lower bound of the full one)
    kept_infl = influence(pruned)
    mine = pruned.mask("feature")
    assert (kept_infl[mine] >= x * (1 - 1e-9)).all()
    where = torch.tensor([full.index(n.name) for n in pruned.nodes])
    assert (infl[where][mine] >= x * (1 - 1e-9)).all()
    assert len(pruned) == len(full) - pruned.info["dropped_features"]
    # every edge out of a kept node equals the full build's bit for bit; an error node's out-edges also
    # carry its folded features' edges
    p, fd = pruned.adjacency, full.dense()
    rows, cols = where[p.indices()[0]], where[p.indices()[1]]
    error = torch.tensor([pruned.nodes[i].kind == "error" for i in p.indices()[1].tolist()])
    assert torch.equal(p.values()[~error], fd[rows[~error], cols[~error]])
    dropped = torch.ones(len(full), dtype=torch.bool)
    dropped[where] = False
    for i in sorted(set(p.indices()[1][error].tolist())):
        node = pruned.nodes[i]
        folded = [j for j in dropped.nonzero()[:, 0].tolist()
                  if full.nodes[j].channel == node.channel and full.nodes[j].position == node.position]
        expect = fd[where][:, [int(where[i]), *folded]].sum(1)           # into the kept targets
        assert torch.allclose(pruned.dense()[:, i], expect, rtol=1e-12, atol=1e-14)
        assert torch.allclose(pruned.writes[i], full.writes[[int(where[i]), *folded]].sum(0), atol=1e-13)


@pytest.mark.parametrize("which", ["transcoders", "mixed", "compression"])
def test_graph_size_bounds_the_build_and_max_edges_stops_it(model, transcoders, mixed_units, tokens, which):
    from tl_modular.attribution.build import EDGE_BYTES, GraphTooLargeError, graph_size

    units = {"transcoders": transcoders, "mixed": mixed_units, "compression": mixed_units[0]}[which]
    full = tlm.attribution_graph(model, tokens, units=units, target=TARGET)
    size = graph_size(model, units, N_POS, 1)
    # transcoder features are counted as if all were active: an upper bound there, exact for write directions
    n_inactive = sum(int(tc.cfg.d_sae) * N_POS for tc in transcoders) - int(
        sum(n.kind == "feature" and n.sae is not None for n in full.nodes)) if which != "compression" else 0
    assert size.nodes == len(full) + n_inactive
    assert full.adjacency._nnz() <= size.edges
    if which == "compression":                     # only exact zeros of the frozen products are missing
        assert size.edges <= 1.01 * full.adjacency._nnz()
    assert size.bytes == 24 * size.nodes * model.cfg.d_model + EDGE_BYTES * size.edges
    # a build that passes max_edges stops with the count; at the graph's own size it does not
    nnz = full.adjacency._nnz()
    assert full.info["edges_built"] == nnz
    with pytest.raises(GraphTooLargeError, match="raise min_influence") as e:
        tlm.attribution_graph(model, tokens, units=units, target=TARGET, max_edges=nnz // 2)
    assert nnz // 2 < e.value.edges <= nnz and e.value.max_edges == nnz // 2
    same = tlm.attribution_graph(model, tokens, units=units, target=TARGET, max_edges=nnz)
    assert torch.equal(same.adjacency.values(), full.adjacency.values())
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_edges must be an int >= 1"):
            tlm.attribution_graph(model, tokens, units=units, target=TARGET, max_edges=bad)
    with pytest.raises(ValueError, match="n_pos and n_targets"):
        graph_size(model, units, 0)


def _task(n=3, seed=5):
    from tl_modular.tasks import Task

    gen = torch.Generator().manual_seed(seed)
    full = lambda v: torch.full((n, 1), v)  # noqa: E731
    return Task(name="random", clean=torch.randint(0, 50, (n, N_POS), generator=gen),
                corrupted=torch.randint(0, 50, (n, N_POS), generator=gen), positions=full(N_POS - 1),
                answers=full(TARGET["answers"][0]), wrong_answers=full(TARGET["wrong_answers"][0]))


@pytest.mark.parametrize("which", ["transcoders", "mixed", "compression"])
def test_the_whole_graph_scores_one_with_the_error_nodes_frozen(model, transcoders, mixed_units, which):
    from tl_modular.attribution import faithfulness

    units = {"transcoders": transcoders, "mixed": mixed_units, "compression": mixed_units[0]}[which]
    task = _task()
    kept = [prune(g, node_threshold=1.0, edge_threshold=1.0) for g in tlm.attribution_graph(model, task, units=units)]
    # features without a path to the logit in the graph are pruned even at thresholds 1 (with transcoders
    # only, every feature off the scored position: the heads are error nodes); frozen, they change nothing
    assert any(int((~k.nodes & k.graph.mask("feature")).sum()) > 0 for k in kept) or which == "compression"
    for baseline in ("mean", "corrupted"):
        got = faithfulness(model, task, units, kept, baseline=baseline, n_random=1)
        assert got["faithfulness"] == pytest.approx(1.0, abs=1e-9)           # float64 model
        assert abs(got["clean"] - got["ablated"]) > 1e-3 and got["random"][0] < 1 - 1e-3
    old = faithfulness(model, task, units, kept, baseline="corrupted", errors="recomputed")
    if which == "transcoders":      # the heads respond to the pruned features through the recomputed run
        assert old["faithfulness"] < 0.99
    with pytest.raises(ValueError, match="errors must be 'frozen' or 'recomputed'"):
        faithfulness(model, task, units, kept, errors="live")
    assert count_hooks(model) == 0


def test_frozen_error_nodes_hold_the_clean_writes(model, transcoders, tokens):
    """The error nodes' clean values against the cache (an uncovered head's whole write, an MLP's output
    minus its transcoder's); held at them, setting a layer-0 transcoder feature at one position leaves
    every later position's logits exactly clean (its only way there is through the heads, error nodes
    at their clean writes), while recomputed error nodes carry it on."""
    from tl_modular.attribution import run_with_features
    from tl_modular.attribution.intervention import clean_errors

    batch = tokens[None]
    x0, _ = _inputs(model, tokens, transcoders[0])
    with torch.no_grad():
        acts = {"L0.MLP": transcoders[0].encode(x0)[None],
                "L1.MLP": transcoders[1].encode(_inputs(model, tokens, transcoders[1])[0])[None]}
        masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in acts.items()}
        errors = clean_errors(model, transcoders, batch)
        clean, cache = model.run_with_cache(batch)
        assert set(errors) == {f"L{l}.H{h}" for l in range(2) for h in range(model.cfg.n_heads)} | {"L0.MLP", "L1.MLP"}
        head = cache[act_name("z", 1)][0, :, 2] @ model.blocks[1].attn.W_O[2]
        assert torch.allclose(errors["L1.H2"][0], head, atol=1e-14)          # an uncovered head: its whole write
        recon = transcoders[1].decode(acts["L1.MLP"][0])
        assert torch.allclose(errors["L1.MLP"][0], cache[act_name("mlp_out", 1)][0] - recon, atol=1e-12)
        same = run_with_features(model, transcoders, batch, masks, acts, errors=errors)
        assert torch.allclose(same, clean, atol=1e-12)
        p, j = 3, int(acts["L0.MLP"][0, 3].argmax())
        masks["L0.MLP"][0, p, j] = False
        base = {k: v.clone() for k, v in acts.items()}
        base["L0.MLP"][0, p, j] += 0.5
        got = run_with_features(model, transcoders, batch, masks, base, errors=errors)
        live = run_with_features(model, transcoders, batch, masks, base)
    assert torch.allclose(got[0, p + 1:], clean[0, p + 1:], atol=1e-12)     # later positions: through heads only
    assert (got[0, p] - clean[0, p]).abs().max() > 1e-3                       # its own position moves
    assert (live[0, -1] - clean[0, -1]).abs().max() > 1e-6                    # recomputed: the heads carry it
    assert count_hooks(model) == 0
