"""Route scores by attribution (``graph.circuits``) vs exact per-route patching, on the bundled model.

    python benchmarks/circuit_scores.py [--examples 128] [--threads 2]

For each toy task: the attribution scores of every route of the bundled model's channel graph
(one forward and one backward pass per batch) against the exact effect of patching each route
alone to the corrupted run (one forward pass per route). Prints both times, their ratio and the
Spearman correlation of |score| with |exact effect| over all routes; the same for integrated
gradients (``ig_steps=5``).

    python benchmarks/circuit_scores.py --gpt2 [--examples 16] [--sample 40]

The same on a GPT-2-small-shaped model (random weights, 32,936 routes) with IOI prompts from the
real tokenizer: attribution for every route against exact patching of a random sample of routes,
whose per-route time gives the exact cost of all routes (extrapolated, not run).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--examples", type=int, default=None, help="examples per task (default 128; 16 with --gpt2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpt2", action="store_true", help="a GPT-2-small-shaped model and IOI prompts")
    parser.add_argument("--sample", type=int, default=40, help="routes patched exactly with --gpt2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpt2:
        return gpt2(args)
    args.examples = args.examples or 128

    import tl_modular as tlm
    from tl_modular import circuits as circuits_mod
    from tl_modular import toy
    from tl_modular.graph import routes as _routes
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


def gpt2(args: argparse.Namespace) -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    import tl_modular as tlm
    from tl_modular import circuits as circuits_mod
    from tl_modular.graph import routes as _routes
    from tl_modular.graph import spearman
    from tl_modular.patching import capture_writes, patch_routes
    from tl_modular.testing import gpt2_small_model

    tok = AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-tokenizer"),
                                        add_bos_token=True)
    model = gpt2_small_model(seed=0)
    tokens = torch.randint(0, 50257, (16, 129), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens, batch_size=8, progress=False)
    graph = tlm.build_graph(comp, model=model)
    channels = tlm.segment(model)
    routes = sorted(graph.routes())
    senders = sorted({w for w, _ in routes})
    writers = {w.name: w for w in _routes.writers(comp, channels)}
    n = args.examples or 16
    task = tlm.tasks.ioi(tok, n, seed=0)
    cat = circuits_mod._category("ioi", task, model, channels, senders, writers, "corrupted")
    start = time.perf_counter()
    scores = circuits_mod._scores(model, channels, graph, cat, routes, batch_size=n, chunk=64).mean(0)
    t_attr = time.perf_counter() - start
    rng = np.random.default_rng(0)
    sample = rng.choice(len(routes), size=min(args.sample, len(routes)), replace=False)
    with torch.no_grad():
        source = capture_writes(model, channels, task.corrupted, senders)
        clean = float(task.metric(model(task.clean)))
        start = time.perf_counter()
        exact = [clean - float(task.metric(patch_routes(model, channels, task.clean, [routes[i]], source)))
                 for i in sample]
        per_route = (time.perf_counter() - start) / len(sample)
    t_exact = per_route * len(routes)
    rho = spearman(np.abs(scores[sample]), np.abs(exact))
    print(f"GPT-2-small shape, {len(routes)} routes, {n} IOI prompts, threads={args.threads}")
    print(f"attribution (all routes) {t_attr:.1f} s; exact {per_route:.2f} s per route -> {t_exact:.0f} s for all "
          f"({t_exact / t_attr:.0f}x); Spearman on {len(sample)} sampled routes {rho:.2f}")


if __name__ == "__main__":
    main()
