"""Attribution graphs on the bundled model: time per graph and the edges needed for faithfulness 0.9.

Per task (induction, modular addition, brackets, sorting): a compression fitted on 64 of the
task's prompts (``tlm.compress`` defaults; with ``--sae`` the MLPs' write sides are replaced by the
bundled SAEs on ``hook_mlp_out``), one attribution graph per evaluation prompt, pruned by
logit influence at a sweep of edge thresholds (node threshold 1: the edges alone decide), and
verified by intervention: keep the features touched by the kept edges, set every other write
feature to its mean (``baseline="mean"``) or to its corrupted-run value (``"corrupted"``).
Reported: milliseconds per graph (fp32 model, float64 arithmetic, one thread), the smallest mean
fraction of edges whose faithfulness reaches 0.9, the kept features there, and the faithfulness
of random feature sets of the same size; then the faithfulness at ``prune``'s default thresholds
(what the report's stage uses). Error nodes are held at their clean values (``faithfulness``'s
default; ``--errors recomputed``: as the intervened run computes them, the behaviour before).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/attribution.py              # ~3-4 min
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/attribution.py --prompts 4  # quicker
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/attribution.py --sae        # MLPs as SAE features

``--gpt2``: one graph on a GPT-2-small-shaped model (random weights, 64 tokens) whose 12 MLPs are
replaced by random sae-lens transcoders of 6,144 features (reading ``ln2.hook_normalized``, about
1% of the features active per token, as trained transcoders' L0 of ~60), full and pruned while
building (``--min-influence``), plus one graph on the bundled model for comparison. The aim: ≤ 60 s
per GPT-2 graph on 2 cores, ≤ 2 s on the bundled model.

    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/attribution.py --gpt2 --min-influence 1e-4
    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/attribution.py --gpt2 --float64
"""

from __future__ import annotations

import argparse
import time

import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular.attribution import faithfulness, prune

TASKS = {"induction": toy.induction, "modular_addition": toy.modular_addition, "brackets": toy.brackets,
         "sorting": toy.sorting}
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--random", type=int, default=3)
    parser.add_argument("--sae", action="store_true",
                        help="MLP nodes: the bundled SAEs' features (hook_mlp_out), not write directions")
    parser.add_argument("--gpt2", action="store_true",
                        help="one graph on a GPT-2-small-shaped model with 6,144-feature transcoders per layer")
    parser.add_argument("--float64", action="store_true", help="with --gpt2: the model in float64")
    parser.add_argument("--min-influence", type=float, default=None,
                        help="with --gpt2: also build pruned while building at this influence")
    parser.add_argument("--errors", choices=("frozen", "recomputed"), default="frozen",
                        help="the error nodes in the interventions (faithfulness's errors=)")
    args = parser.parse_args()
    if args.gpt2:
        gpt2(args.float64, args.min_influence)
        return
    torch.set_num_threads(1)
    model = toy.load_model()
    rows = []
    for name, make in TASKS.items():
        comp = tlm.compress(model, make(64, seed=0).clean, progress=False)
        if args.sae:
            comp = [comp, *(s for h, s in tlm.sae.bundled(model).items() if h.endswith("hook_mlp_out"))]
        task = make(args.prompts, seed=1234)
        tlm.attribution_graph(model, task[:1], units=comp)          # warm-up
        start = time.perf_counter()
        graphs = tlm.attribution_graph(model, task, units=comp)
        per_graph = (time.perf_counter() - start) / len(graphs)
        worst = max(g.completeness() for g in graphs)
        found = {}
        for baseline in ("mean", "corrupted"):
            found[baseline] = None
            for t in THRESHOLDS:
                kept = [prune(g, node_threshold=1.0, edge_threshold=t) for g in graphs]
                res = faithfulness(model, task, comp, kept, baseline=baseline, n_random=args.random,
                                   errors=args.errors)
                frac = sum(k.edge_fraction for k in kept) / len(kept)
                feats = sum(int(k.nodes[k.graph.mask("feature")].sum()) for k in kept) / len(kept)
                n_feat = int(graphs[0].mask("feature").sum())
                rnd = max(res["random"], default=float("nan"))
                found[baseline] = (t, frac, feats / n_feat, res["faithfulness"], rnd)
                if res["faithfulness"] >= 0.9:
                    break
        default = [prune(g) for g in graphs]
        frac = sum(k.edge_fraction for k in default) / len(default)
        found["default"] = {b: (faithfulness(model, task, comp, default, baseline=b,
                                             errors=args.errors)["faithfulness"], frac) for b in ("mean", "corrupted")}
        rows.append((name, len(graphs), graphs[0].adjacency._nnz(), per_graph, worst, found))
    print(f"{'task':18} {'prompts':>7} {'edges/graph':>11} {'ms/graph':>9} {'complete':>9}  "
          f"{'baseline':9} {'thresh':>6} {'edge frac':>9} {'feat frac':>9} {'faithful':>8} {'random max':>10}")
    for name, n, edges, per_graph, worst, found in rows:
        default = found.pop("default")
        for baseline, (t, frac, feats, f, rnd) in found.items():
            print(f"{name:18} {n:7d} {edges:11d} {1000 * per_graph:9.0f} {worst:9.1e}  {baseline:9} {t:6.2f} "
                  f"{frac:9.5f} {feats:9.3f} {f:8.3f} {rnd:10.3f}")
        print(f"{'':18} prune() defaults (node 0.8, edge 0.98): " + ", ".join(
            f"{b} {f:.3f} with {frac:.5f} of the edges" for b, (f, frac) in default.items()))


def random_transcoders(model: torch.nn.Module, d_sae: int = 6144, active: float = 0.01, seed: int = 0) -> list:
    """One random ReLU transcoder per MLP: unit-norm encoder columns read ``ln2.hook_normalized``
    (unit variance per dimension), so each pre-activation is ~N(0, 1) and a bias at the ``1 - active``
    quantile leaves about ``active`` of the features on per token."""
    from sae_lens import Transcoder, TranscoderConfig

    d = model.cfg.d_model
    gen = torch.Generator().manual_seed(seed)
    cut = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - active)))
    out = []
    for layer in range(model.cfg.n_layers):
        cfg = TranscoderConfig(d_in=d, d_sae=d_sae, d_out=d, apply_b_dec_to_input=False)
        cfg.metadata.hook_name = f"blocks.{layer}.ln2.hook_normalized"
        cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
        tc = Transcoder(cfg)
        with torch.no_grad():
            w = torch.randn(d, d_sae, generator=gen)
            tc.W_enc.copy_(w / w.norm(dim=0, keepdim=True))
            tc.b_enc.fill_(-cut)
            tc.W_dec.copy_(torch.randn(d_sae, d, generator=gen) / (d_sae * active) ** 0.5)
        out.append(tc.eval().to(model.cfg.dtype))
    return out


def gpt2(float64: bool, min_influence: float | None) -> None:
    from tl_modular.testing import gpt2_small_model

    print(f"torch threads: {torch.get_num_threads()}")
    model = gpt2_small_model(seed=0)
    if float64:
        model = model.to(torch.float64)
    tcs = random_transcoders(model)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (64,), generator=gen)
    target = {"positions": [63], "answers": [int(tokens[10])], "wrong_answers": [int(tokens[20])]}
    tlm.attribution_graph(model, tokens[:8], units=tcs, target={**target, "positions": [7]})   # warm-up
    runs = [("full", None)] + ([(f"min_influence={min_influence:g}", min_influence)] if min_influence else [])
    for label, x in runs:
        start = time.perf_counter()
        g = tlm.attribution_graph(model, tokens, units=tcs, target=target, min_influence=x)
        took = time.perf_counter() - start
        n_feat = int(g.mask("feature").sum())
        print(f"GPT-2 shape, {'float64' if float64 else 'fp32'} model, {label}: {took:.1f} s, {len(g):,} nodes "
              f"({n_feat:,} transcoder features, {g.info.get('dropped_features', 0):,} folded), "
              f"{g.adjacency._nnz():,} edges, completeness {g.completeness():.1e}")
        del g
    small = toy.load_model()
    task = toy.induction(2, seed=1234)
    comp = tlm.compress(small, toy.induction(64, seed=0).clean, progress=False)
    saes = [s for h, s in tlm.sae.bundled(small).items() if h.endswith("hook_mlp_out")]
    for label, units in (("compression", comp), ("compression + SAEs", [comp, *saes])):
        tlm.attribution_graph(small, task[:1], units=units)
        start = time.perf_counter()
        g = tlm.attribution_graph(small, task[:1], units=units)[0]
        print(f"bundled model, induction prompt, {label}: {time.perf_counter() - start:.2f} s, "
              f"{g.adjacency._nnz():,} edges, completeness {g.completeness():.1e}")


if __name__ == "__main__":
    main()
