"""Ground truth for attribution graphs: a hand-made two-layer transformer whose MLP features are
planted, with SAEs that read exactly those features.

- Layer 0's MLP turns token ``t < 6`` into the feature ``u_t``: six unit directions packed into four
  residual dimensions (superposition; pairwise |cos| ≤ 1/2). Its SAE reads them with a threshold
  ``τ = 3/4`` above the interference, so exactly the planted feature is active, at 1.
- Layer 1's MLP has one ReLU neuron per layer-0 feature (``relu(u_k · x - τ)``) that writes the
  layer-1 features ``z_c`` (orthonormal) that ``CONNECT[k]`` lists; its SAE reads ``z_c``.
- The unembedding reads ``z_0 + z_1`` for the answer and ``z_2`` for the wrong answer.

Attention writes nothing and there is no normalisation, so every number of the graph is known in
closed form: the features active at each position, the edges between them (only the planted
ones, weight ``1/(1 - τ)``), their edges into the logit, and the logit's change when a feature is
steered."""

from __future__ import annotations

import math

import pytest
import torch

import tl_modular as tlm
from tl_modular._models import count_hooks
from tl_modular.attribution import aggregate, faithfulness, feature_masks, prune, run_with_features

TAU = 0.75
#: layer-0 feature (token) -> the layer-1 features it turns on
CONNECT = {0: [0], 1: [0, 1], 2: [1], 3: [2], 4: [], 5: [0, 2]}
ANSWER, WRONG = 6, 7
D_MODEL, U0, Z0 = 16, 8, 12          # token dims 0..7, layer-0 feature dims 8..11, layer-1 dims 12..14


def _u() -> torch.Tensor:
    """Six unit vectors in four dimensions, pairwise |cos| ∈ {0, 1/2}."""
    e = torch.eye(4, dtype=torch.float64)
    pairs = [(0, 1, 1), (2, 3, 1), (0, 1, -1), (2, 3, -1), (0, 2, 1), (1, 3, 1)]
    return torch.stack([(e[i] + s * e[j]) / math.sqrt(2) for i, j, s in pairs])


def _planted():
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, d_head=4, n_heads=1, d_mlp=8, d_vocab=8, n_ctx=8,
                                  act_fn="relu", normalization_type=None, positional_embedding_type="standard",
                                  dtype=torch.float64, seed=0)
    model = HookedTransformer(cfg)
    u = torch.zeros(6, D_MODEL, dtype=torch.float64)
    u[:, U0:U0 + 4] = _u()
    z = torch.zeros(3, D_MODEL, dtype=torch.float64)
    z[:, Z0:Z0 + 3] = torch.eye(3, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:] = torch.eye(8, D_MODEL, dtype=torch.float64)
        m0, m1 = model.blocks[0].mlp, model.blocks[1].mlp
        m0.b_in[:] = m1.b_in[:] = -1.0              # neurons 6, 7: never on
        for k in range(6):
            m0.W_in[k, k], m0.b_in[k] = 1.0, 0.0      # on (at 1) for token k
            m0.W_out[k] = u[k]
            m1.W_in[:, k], m1.b_in[k] = u[k], -TAU    # on (at 1 - τ) when u_k alone is present
            m1.W_out[k] = sum((z[c] for c in CONNECT[k]), torch.zeros(D_MODEL, dtype=torch.float64)) / (1 - TAU)
        model.unembed.W_U[:, ANSWER] = z[0] + z[1]
        model.unembed.W_U[:, WRONG] = z[2]
    saes = []
    for layer, dec, w_enc, b_enc in ((0, u, u.T / (1 - TAU), -TAU / (1 - TAU)), (1, z, z.T, 0.0)):
        sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=len(dec), dtype="float64",
                                            metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_mlp_out")))
        with torch.no_grad():
            sae.W_dec[:] = dec
            sae.W_enc[:] = w_enc
            sae.b_enc[:] = b_enc
            sae.b_dec.zero_()
        saes.append(sae)
    return model, saes


@pytest.fixture(scope="module")
def planted(one_thread):
    return _planted()


TOKENS = torch.tensor([0, 1, 2, 3, 4, 5, 1, 3])
TARGET = {"positions": [1, 5, 6], "answers": [ANSWER] * 3, "wrong_answers": [WRONG] * 3}


@pytest.fixture(scope="module")
def graph(planted):
    model, saes = planted
    return tlm.attribution_graph(model, TOKENS, units=saes, target=TARGET)


def _logit_per_unit(c: int) -> float:
    """∂logit/∂(layer-1 feature c at a scored position): the unembedding's difference over 3 positions."""
    return (1.0 if c in (0, 1) else -1.0) / len(TARGET["positions"])


def test_the_planted_features_are_the_active_nodes(planted, graph):
    model, _ = planted
    assert graph.completeness() < 1e-12
    # the model computes what was planted: logit difference = Σ over layer-1 features, per position
    with torch.no_grad():
        logits = model(TOKENS[None])[0]
    for p in range(len(TOKENS)):
        c = CONNECT.get(int(TOKENS[p]), [])
        assert float(logits[p, ANSWER] - logits[p, WRONG]) == pytest.approx(
            sum(1 if k in (0, 1) else -1 for k in c), abs=1e-12)
    got = {(n.sae, n.index, n.position) for n in graph.nodes if n.kind == "feature"}
    expect = {("blocks.0.hook_mlp_out", int(t), p) for p, t in enumerate(TOKENS.tolist()) if t < 6}
    expect |= {("blocks.1.hook_mlp_out", c, p) for p, t in enumerate(TOKENS.tolist()) for c in CONNECT.get(t, [])}
    assert got == expect                                       # despite six features in four dimensions
    feats = graph.mask("feature")
    assert torch.allclose(graph.activation[feats], torch.ones(int(feats.sum()), dtype=torch.float64), atol=1e-12)
    # the SAEs reconstruct the MLPs exactly: every MLP error node writes nothing
    for i, n in enumerate(graph.nodes):
        if n.kind == "error" and n.channel.endswith("MLP"):
            assert graph.writes[i].abs().max() < 1e-12


def test_the_planted_connections_are_the_edges(graph):
    a = graph.dense()
    feats = [i for i, n in enumerate(graph.nodes) if n.kind == "feature"]
    layer = {i: int(graph.nodes[i].sae.split(".")[1]) for i in feats}
    for t in feats:
        nt = graph.nodes[t]
        for s in feats:
            ns = graph.nodes[s]
            planted = (layer[s] == 0 and layer[t] == 1 and ns.position == nt.position
                       and nt.index in CONNECT[ns.index])
            assert float(a[t, s]) == pytest.approx(1 / (1 - TAU) if planted else 0.0, abs=1e-12), (ns.name, nt.name)
        if layer[t] == 1:
            # the layer-1 feature's pre-activation is its one planted edge minus the neuron's threshold
            assert float(graph.bias[t]) == pytest.approx(-TAU / (1 - TAU), abs=1e-12)
    # into the logit: only layer-1 features at scored positions, ±1/3 each
    for s in feats:
        ns = graph.nodes[s]
        scored = layer[s] == 1 and ns.position in TARGET["positions"]
        assert float(a[graph.logit, s]) == pytest.approx(_logit_per_unit(ns.index) if scored else 0.0, abs=1e-12)


def test_pruning_keeps_the_planted_path_to_the_logit(graph):
    kept = prune(graph, node_threshold=1.0, edge_threshold=1.0)
    scored = set(TARGET["positions"])
    names = set(kept.features())
    expect = set()
    for p in scored:
        t = int(TOKENS[p])
        expect.add(f"sae:blocks.0.hook_mlp_out/F{t}@{p}")
        expect |= {f"sae:blocks.1.hook_mlp_out/F{c}@{p}" for c in CONNECT[t]}
    assert names == expect                   # nothing at unscored positions, nothing unplanted
    # per category: the planted features of the scored tokens, nothing else
    s = aggregate([graph], node_threshold=1.0)
    assert set(s["all"].features) == {n.rsplit("@", 1)[0] for n in expect}
    assert {(a, b) for a, b, *_ in s["all"].edges} == (
        {(f"sae:blocks.0.hook_mlp_out/F{int(TOKENS[p])}", f"sae:blocks.1.hook_mlp_out/F{c}")
         for p in scored for c in CONNECT[int(TOKENS[p])]}
        | {(f"sae:blocks.1.hook_mlp_out/F{c}", "logit") for p in scored for c in CONNECT[int(TOKENS[p])]})


@pytest.mark.parametrize("position", [1, 5, 6])
def test_steering_a_feature_moves_the_logit_as_the_graph_predicts(planted, graph, position):
    model, saes = planted
    t = int(TOKENS[position])
    source = graph.index(f"sae:blocks.0.hook_mlp_out/F{t}@{position}")
    # the graph's prediction: Σ over paths of edge / activation of each source along it (DAG)
    a = graph.dense() / graph.activation.clamp_min(1e-300)[None, :]
    e = torch.zeros(len(graph), dtype=torch.float64)
    e[graph.logit] = 1
    per_unit = (e @ torch.linalg.inv(torch.eye(len(graph), dtype=torch.float64) - a))[source]
    assert float(per_unit) == pytest.approx(sum(_logit_per_unit(c) for c in CONNECT[t]) / (1 - TAU), abs=1e-12)
    masks = {f"L{i}.MLP": torch.ones(1, len(TOKENS), s.cfg.d_sae, dtype=torch.bool) for i, s in enumerate(saes)}
    base = {n: torch.zeros(m.shape, dtype=torch.float64) for n, m in masks.items()}
    masks["L0.MLP"][0, position, t] = False
    base["L0.MLP"][0, position, t] = 1.2                       # steer the feature from 1 to 1.2
    with torch.no_grad():
        steered = run_with_features(model, saes, TOKENS[None], masks, base)[0]
        clean = model(TOKENS[None])[0]
    metric = lambda lg: float(sum(lg[p, ANSWER] - lg[p, WRONG] for p in TARGET["positions"])) / 3  # noqa: E731
    assert metric(steered) - metric(clean) == pytest.approx(0.2 * float(per_unit), abs=1e-12)
    assert count_hooks(model) == 0


def test_intervention_keeps_the_metric_with_the_pruned_graph(planted, graph):
    from tl_modular.tasks import Task

    model, saes = planted
    clean = TOKENS[None]
    corrupted = torch.tensor([[4, 4, 4, 4, 4, 4, 4, 4]])     # token 4 turns on no layer-1 feature
    task = Task(name="planted", clean=clean, corrupted=corrupted,
                positions=torch.tensor([TARGET["positions"]]), answers=torch.tensor([[ANSWER] * 3]),
                wrong_answers=torch.tensor([[WRONG] * 3]), metric_kind="logit_diff")
    kept = [prune(graph, node_threshold=1.0, edge_threshold=1.0)]
    assert faithfulness(model, task, saes, kept, baseline="corrupted")["faithfulness"] == pytest.approx(1.0, abs=1e-6)
    # ablate one kept feature more (features outside the graph stay as computed: with the corrupted
    # baseline, feature 4 would turn on beside the clean one): the metric loses that feature's paths
    nodes = feature_masks(model, kept, saes, every_node=True)
    for position, expect in ((1, 0.5), (5, 1.0), (6, 0.5)):        # token 1: +2/3 of 4/3; token 5: +1 - 1
        masks = {n: m | ~nodes[n] for n, m in feature_masks(model, kept, saes).items()}
        masks["L0.MLP"][0, position, int(TOKENS[position])] = False
        result = faithfulness(model, task, saes, masks, baseline="corrupted")
        assert result["faithfulness"] == pytest.approx(expect, abs=1e-6)   # Task.metric works in fp32
    assert count_hooks(model) == 0
