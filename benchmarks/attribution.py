"""Attribution graphs on the bundled model: time per graph and the edges needed for faithfulness 0.9.

Per task (induction, modular addition, brackets, sorting): a compression fitted on 64 of the
task's prompts (``tlm.compress`` defaults; with ``--sae`` the MLPs' write sides are replaced by the
bundled SAEs on ``hook_mlp_out``), one attribution graph per evaluation prompt, pruned by
logit influence at a sweep of edge thresholds (node threshold 1: the edges alone decide), and
verified by intervention: keep the features touched by the kept edges, set every other write
feature to its mean (``baseline="mean"``) or to its corrupted-run value (``"corrupted"``).
Reported: milliseconds per graph (fp32 model, float64 arithmetic, one thread), the smallest mean
fraction of edges whose faithfulness reaches 0.9, the kept features there, and the faithfulness
of random feature sets of the same size.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/attribution.py              # ~3-4 min
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/attribution.py --prompts 4  # quicker
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/attribution.py --sae        # MLPs as SAE features
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
    args = parser.parse_args()
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
                res = faithfulness(model, task, comp, kept, baseline=baseline, n_random=args.random)
                frac = sum(k.edge_fraction for k in kept) / len(kept)
                feats = sum(int(k.nodes[k.graph.mask("feature")].sum()) for k in kept) / len(kept)
                n_feat = int(graphs[0].mask("feature").sum())
                rnd = max(res["random"], default=float("nan"))
                found[baseline] = (t, frac, feats / n_feat, res["faithfulness"], rnd)
                if res["faithfulness"] >= 0.9:
                    break
        rows.append((name, len(graphs), graphs[0].adjacency._nnz(), per_graph, worst, found))
    print(f"{'task':18} {'prompts':>7} {'edges/graph':>11} {'ms/graph':>9} {'complete':>9}  "
          f"{'baseline':9} {'thresh':>6} {'edge frac':>9} {'feat frac':>9} {'faithful':>8} {'random max':>10}")
    for name, n, edges, per_graph, worst, found in rows:
        for baseline, (t, frac, feats, f, rnd) in found.items():
            print(f"{name:18} {n:7d} {edges:11d} {1000 * per_graph:9.0f} {worst:9.1e}  {baseline:9} {t:6.2f} "
                  f"{frac:9.5f} {feats:9.3f} {f:8.3f} {rnd:10.3f}")


if __name__ == "__main__":
    main()
