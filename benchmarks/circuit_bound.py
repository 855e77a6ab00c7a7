"""How small can each task's circuit on the bundled model be? The best faithfulness found at a
given size by searches stronger than ``graph.circuits``' own.

    python benchmarks/circuit_bound.py [--tasks brackets,sorting] [--fraction 0.2] [--threads 2]

Per task, starting from ``graph.circuits``' circuit (faithfulness >= 0.9, the learnt mask's or the
attribution order's, whichever is smaller):

1. backward elimination: drop, one at a time, the route whose removal keeps faithfulness highest,
   down to ``fraction`` of all routes (one patched pass per candidate);
2. a swap hill-climb at that size: add the outside route that helps most, drop the inside route
   that hurts least, while faithfulness rises;
3. the learnt relaxed mask (``search="mask"``) under eight penalty schedules (final sparsity
   weight 10, 30, 100, 300; 200 and 600 steps), every hard mask along the way verified by
   patching: the best faithfulness seen at each size.

Prints the best faithfulness reached at ``fraction`` of the routes and the smallest size at which
any search reached 0.9. Issue 6 asks for 0.9 at <= 20% of the routes.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", default="brackets,sorting")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular import circuits as cm
    from tl_modular import toy
    from tl_modular.graph import routes as _routes

    model = toy.load_model()
    tokens, mask, scored = toy.mixed_tokens(n_per_task=32, seed=2, scored=True)
    comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
    graph = tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored,
                            metric="logit", progress=False)
    channels = tlm.segment(model)
    routes = sorted(graph.routes("static"))
    senders = sorted({w for w, _ in routes})
    writers = {w.name: w for w in _routes.writers(comp, channels)}
    size = int(args.fraction * len(routes))
    print(f"{len(routes)} routes; target size {size} ({args.fraction:.0%})")
    for name in args.tasks.split(","):
        start = time.perf_counter()
        task = toy.GENERATORS[name](64, seed=5)
        cat = cm._category(name, task, model, channels, senders, writers, "corrupted")
        clean = cm._patched_metric(model, channels, cat, [], 64)
        empty = cm._patched_metric(model, channels, cat, routes, 64)
        best: dict[int, float] = {}

        def faithful(kept, cat=cat, empty=empty, den=clean - empty, best=best):
            keep = set(kept)
            m = cm._patched_metric(model, channels, cat, [r for r in routes if r not in keep], 64)
            f = cm._ratio(m - empty, den)
            best[len(kept)] = max(best.get(len(kept), -float("inf")), f)
            return f, m

        f = lambda kept: faithful(kept)[0]  # noqa: E731
        found = graph.circuits(model, {name: task}, n_boot=10, n_random=1, progress=False)[name]
        cur = list(found.routes)
        while len(cur) > size:                                            # 1. backward elimination
            drop = max(cur, key=lambda r, cur=cur: f([x for x in cur if x != r]))
            cur = [x for x in cur if x != drop]
        swaps = 0
        while True:                                                       # 2. swap hill-climb
            now = f(cur)
            inside = set(cur)
            add = max((r for r in routes if r not in inside), key=lambda r, cur=cur: f(cur + [r]))
            bigger = cur + [add]
            drop = max(bigger, key=lambda r, bigger=bigger: f([x for x in bigger if x != r]))
            if drop == add or f([x for x in bigger if x != drop]) <= now + 1e-9:
                break
            cur, swaps = [x for x in bigger if x != drop], swaps + 1
        local = f(cur)
        for lam1 in (10.0, 30.0, 100.0, 300.0):                            # 3. mask schedules
            for steps in (200, 600):
                # target 2 is never reached, so every hard mask along the way is verified (and recorded)
                cm._learn_mask(model, channels, cat, routes, clean, empty, 2.0, faithful, steps=steps,
                               batch_size=64, check_every=5, penalty=(0.5, lam1))
        smallest = min(k for k, v in best.items() if v >= 0.9)
        print(f"{name:>16}: graph.circuits {found.size} routes ({found.size / len(routes):.0%}); at {size} routes "
              f"the best faithfulness is {max(v for k, v in best.items() if k <= size):.3f} (elimination + "
              f"{swaps} swaps {local:.3f}); smallest size reaching 0.9 by any search: {smallest} "
              f"({smallest / len(routes):.0%}); {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
