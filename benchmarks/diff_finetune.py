"""Diff the bundled model against a copy fine-tuned briefly on one task: do the top changed routes
lie in that task's circuit more than in any other task's (issue 9, item 4)?

Headline (the set-up of the slow test in tests/test_diff.py; about 6 minutes on 2 cores):

    nice .venv/bin/python benchmarks/diff_finetune.py --tasks induction --seeds 0,1,2,3

For every fine-tune it counts how many of the ``--top`` routes each task's circuit holds, for two
rankings of the route changes:

- ``delta``: the raw change of each route's share of the total strength (``tlm.diff(a, b)``);
- ``z``: the change against chance (``tlm.diff(a, b, null=...)``): ``--n-null`` copies of the
  shipped model moved as far as the fine-tune moved it, tensor by tensor, in random directions
  (``tlm.diff_null``), each route's change divided by its RMS change to those copies.

The defaults: AdamW lr 1e-4 with eps 1e-6, 200 steps, no warm-up, no weight decay, on 2000 prompts of
the one task, continuing the shipped model; all graphs built on the same four-task mix (64
prompts per task); circuits of the original model (``graph.circuits`` on 64 prompts per task).
``--shifted`` fine-tunes on what the shipped model cannot do yet (a change of behaviour, not just
of confidence): induction on repeats of 3..7 tokens (it was trained on 8..11 and gets 2-50% of
them), modular addition on the 30% of pairs held out of its training (~98% already, by
generalisation); brackets and sorting have no shifted version.

Why these settings: the shipped model's task loss is ~1e-6, so the gradient is tiny. Adam with
torch's eps (1e-8) normalises it to steps of ~lr on *every* weight, so at lr 1e-3 the "brief"
fine-tune moves the whole model (other tasks fall to 10-60% accuracy). lr 1e-4 keeps every task
at ~100%; eps 1e-6 keeps weights with negligible gradient where they are. Even so the raw
ranking puts the strong routes every task shares first (they sit in the large brackets and
sorting circuits): any move of the weights changes them most. The z ranking asks what changed
more than a move of the same size in no particular direction would change it.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import tl_modular as tlm
from tl_modular import toy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    p.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds (batch order)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eps", type=float, default=1e-6, help="AdamW eps (torch's default is 1e-8)")
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--n-null", type=int, default=3, help="null models per fine-tune for the z ranking (0: none)")
    p.add_argument("--shifted", action="store_true",
                   help="fine-tune induction on repeats of 3..7 tokens, addition on its held-out pairs")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = toy.load_model()
    tokens, mask, scored = toy.mixed_tokens(n_per_task=64, seed=2, scored=True)
    evals = toy.eval_tasks(256)

    def graph_of(m):
        comp = tlm.compress(m, tokens, attention_mask=mask, progress=False)
        return tlm.build_graph(comp, model=m, tokens=tokens, attention_mask=mask, loss_mask=scored,
                               metric="logit", progress=False)

    ga = graph_of(model)
    tasks = {name: gen(64, seed=5) for name, gen in toy.GENERATORS.items()}
    circuits = ga.circuits(model, tasks, n_boot=20, n_random=1, batch_size=64, progress=False)
    print(f"setup {time.perf_counter() - t0:.1f}s; circuit sizes", {k: c.size for k, c in circuits.items()})
    chosen = list(toy.GENERATORS) if args.tasks == "all" else args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.shifted and set(chosen) - {"induction", "modular_addition"}:
        raise SystemExit("--shifted has versions of induction and modular_addition only")

    def overlap_of(routes):
        top = {r.route for r in routes[:args.top]}
        return {k: len(top & set(c.routes)) for k, c in circuits.items()}

    def data_for(task):
        if task == "induction" and args.shifted:
            return toy.induction(2000, seed=77, repeat=(3, 7))
        if task == "modular_addition":
            return toy.modular_addition(2000, seed=77, split="test" if args.shifted else "train")
        return toy.GENERATORS[task](2000, seed=77)

    rows = []
    for task in chosen:
        for seed in seeds:
            t1 = time.perf_counter()
            tuned = copy.deepcopy(model)
            toy.train(tuned, data_for(task), steps=args.steps, warmup=0, lr=args.lr, eps=args.eps,
                      weight_decay=args.wd, eval_every=10_000, progress=False, seed=seed)
            acc = toy.evaluate(tuned, evals)
            gb = graph_of(tuned)
            found = {"delta": overlap_of(tlm.diff(ga, gb, modules=False).routes)}
            if args.n_null:
                null = [graph_of(m) for m in tlm.diff_null(model, tuned, n=args.n_null, seed=seed)]
                d = tlm.diff(ga, gb, null=null, modules=False)
                found["z"] = overlap_of(d.routes)
                tops = [(r.writer, r.port, round(r.z, 1)) for r in d.top_routes(5)]
            else:
                tops = []
            print(f"tuned on {task} seed {seed} ({time.perf_counter() - t1:.1f}s): "
                  + "; ".join(f"top-{args.top} by {k}: {v}" for k, v in found.items())
                  + f"; lowest accuracy after {min(acc.values()):.3f}; top routes by z {tops}", flush=True)
            for how, overlap in found.items():
                ok = all(overlap[k] < overlap[task] for k in overlap if k != task)
                rows.append((task, seed, how, overlap, ok, min(acc.values())))
    print(f"\nset-up: AdamW lr {args.lr:g} eps {args.eps:g}, {args.steps} steps, weight decay {args.wd:g}"
          + (", shifted tasks" if args.shifted else "") + f"; {args.n_null} null models")
    print("task | seed | ranking | overlaps (" + "/".join(k[:4] for k in circuits) + ") | own strictly highest | "
          "lowest accuracy after")
    for task, seed, how, overlap, ok, low in rows:
        print(f"{task} | {seed} | {how} | {'/'.join(str(v) for v in overlap.values())} | {ok} | {low:.3f}")
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
