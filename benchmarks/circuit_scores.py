"""Route scores by attribution (``graph.circuits``) vs exact per-route patching, on the bundled model.

    python benchmarks/circuit_scores.py [--examples 128] [--threads 2]

For each toy task: the attribution scores of every route of the bundled model's channel graph
(one forward and one backward pass per batch) against the exact effect of patching each route
alone to the corrupted run (one forward pass per route). Prints both times, their ratio and the
Spearman correlation of |score| with |exact effect| over all routes; the same for integrated
gradients (``ig_steps=5``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular import _routes, toy
    from tl_modular import circuits as circuits_mod
    from tl_modular.graph import spearman
    from tl_modular.patching import capture_writes, patch_routes

    model = toy.load_model()
    tokens, mask, scored = toy.mixed_tokens(n_per_task=64, seed=2, scored=True)
    comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
    graph = tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored,
                            metric="logit", progress=False)
    channels = tlm.segment(model)
    routes = sorted(graph.routes())
    senders = sorted({w for w, _ in routes})
    writers = {w.name: w for w in _routes.writers(comp, channels)}
    print(f"{len(routes)} routes, {args.examples} examples per task, threads={args.threads}")
    rows = []
    for name, gen in toy.GENERATORS.items():
        task = gen(args.examples, seed=11)
        cat = circuits_mod._category(name, task, model, channels, senders, writers, "corrupted")
        start = time.perf_counter()
        scores = circuits_mod._scores(model, channels, graph, cat, routes, batch_size=64, chunk=64).mean(0)
        t_attr = time.perf_counter() - start
        start = time.perf_counter()
        ig = circuits_mod._scores(model, channels, graph, cat, routes, batch_size=64, chunk=64, steps=5).mean(0)
        t_ig = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            source = capture_writes(model, channels, task.corrupted, senders)
            clean = float(task.metric(model(task.clean)))
            exact = [clean - float(task.metric(patch_routes(model, channels, task.clean, [r], source)))
                     for r in routes]
        t_exact = time.perf_counter() - start
        rho = spearman(np.abs(scores), np.abs(exact))
        rho_ig = spearman(np.abs(ig), np.abs(exact))
        rows.append((t_exact / t_attr, rho, rho_ig))
        print(f"{name:>16}: attribution {t_attr:.2f} s, exact {t_exact:.2f} s ({t_exact / t_attr:.0f}x), "
              f"Spearman {rho:.2f}; integrated gradients (5 steps) {t_ig:.2f} s, Spearman {rho_ig:.2f}")
    speed, rho, rho_ig = (np.median([r[k] for r in rows]) for k in range(3))
    print(f"median speed-up {speed:.0f}x, median Spearman {rho:.2f} (integrated gradients {rho_ig:.2f})")


if __name__ == "__main__":
    main()
