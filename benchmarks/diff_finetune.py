"""Diff the bundled model against a copy fine-tuned briefly on one task: do the top changed routes
lie in that task's circuit more than in any other task's (issue 9, item 4)?

Headline (the set-up of the slow test in tests/test_diff.py; about 4 minutes on 2 cores):

    nice .venv/bin/python benchmarks/diff_finetune.py --tasks all --seeds 0,1 --null

The defaults: AdamW lr 1e-4 with eps 1e-6, 200 steps, no warm-up, no weight decay, on 2000 prompts of
the one task, continuing the shipped model; both graphs built on the same four-task mix (64
prompts per task); circuits of the original model (``graph.circuits`` on 64 prompts per task).

Why these settings: the shipped model's task loss is ~1e-6, so the gradient is tiny. Adam with
torch's eps (1e-8) normalises it to steps of ~lr on *every* weight, so at lr 1e-3 the "brief"
fine-tune moves the whole model (other tasks fall to 10-60% accuracy) and the top changed routes
are the strong ones all tasks share. lr 1e-4 keeps every task at ~100%; eps 1e-6 keeps weights
with negligible gradient where they are.

``--null`` adds the chance level: the same count for random perturbations (Gaussian, 1% of each
parameter tensor's std), i.e. which circuits hold the routes that change most when nothing
task-specific happens. Circuits that hold the strongest routes (brackets, sorting) are favoured
by chance; count an overlap against that baseline.
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
    p.add_argument("--graph-data", choices=("mix", "task"), default="mix",
                   help="build the diffed graphs on the four-task mix, or on the tuned task's own prompts")
    p.add_argument("--null", action="store_true", help="also report chance overlaps (random perturbations)")
    p.add_argument("--rank-variants", action="store_true",
                   help="also print overlaps when ranking by relative change and by delta/sqrt(share)")
    p.add_argument("--threads", type=int, default=1)
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

    def graph_on(m, task):
        scored = torch.zeros_like(task.clean, dtype=torch.bool)
        scored.scatter_(1, task.positions, True)
        comp = tlm.compress(m, task.clean, progress=False)
        return tlm.build_graph(comp, model=m, tokens=task.clean, loss_mask=scored, metric="logit", progress=False)

    ga = graph_of(model)
    tasks = {name: gen(64, seed=5) for name, gen in toy.GENERATORS.items()}
    circuits = ga.circuits(model, tasks, n_boot=20, n_random=1, batch_size=64, progress=False)
    print(f"setup {time.perf_counter() - t0:.1f}s; circuit sizes", {k: c.size for k, c in circuits.items()})
    chosen = list(toy.GENERATORS) if args.tasks == "all" else args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    short = {k: k[:4] for k in circuits}

    def diff_of(tuned, task):
        if args.graph_data == "task":   # route strengths measured where the fine-tune acted
            prompts = toy.GENERATORS[task](128, seed=9)
            return tlm.diff(graph_on(model, prompts), graph_on(tuned, prompts), modules=False)
        return tlm.diff(ga, graph_of(tuned), modules=False)

    def overlap_of(routes):
        top = {r.route for r in routes[:args.top]}
        return {k: len(top & set(c.routes)) for k, c in circuits.items()}

    if args.null:
        for seed in (1, 2):
            noisy = copy.deepcopy(model)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for q in noisy.parameters():
                    q.add_(0.01 * q.std() * torch.randn(q.shape, generator=g))
            for task in chosen if args.graph_data == "task" else chosen[:1]:
                where = f"on {task} prompts" if args.graph_data == "task" else "on the mix"
                print(f"chance (random 1% perturbation, seed {seed}, {where}): top-{args.top} overlap "
                      f"{overlap_of(diff_of(noisy, task).routes)}")

    rows = []
    for task in chosen:
        for seed in seeds:
            t1 = time.perf_counter()
            tuned = copy.deepcopy(model)
            data = toy.GENERATORS[task](2000, seed=77) if task != "modular_addition" else \
                toy.modular_addition(2000, seed=77, split="train")
            toy.train(tuned, data, steps=args.steps, warmup=0, lr=args.lr, eps=args.eps, weight_decay=args.wd,
                      eval_every=10_000, progress=False, seed=seed)
            acc = toy.evaluate(tuned, evals)
            d = diff_of(tuned, task)
            if args.rank_variants:
                keys = {"relative": lambda r: -abs(r.relative),
                        "chi": lambda r: -abs(r.delta) / max(abs(r.share_a), abs(r.share_b), 1e-300) ** 0.5}
                for kname, key in keys.items():
                    print(f"   rank by {kname}: overlap {overlap_of(sorted(d.routes, key=key))}")
            overlap = overlap_of(d.top_routes(args.top))
            ok = all(overlap[k] < overlap[task] for k in overlap if k != task)
            print(f"tuned on {task:>16} seed {seed} ({time.perf_counter() - t1:.1f}s): top-{args.top} overlap "
                  f"{overlap}; accuracy after {({short[k]: round(acc[k], 3) for k in circuits})}; "
                  f"top channels {[(c.channel, c.side, round(c.max_angle, 1)) for c in d.top_channels(4)]}",
                  flush=True)
            rows.append((task, seed, overlap, ok, min(acc[k] for k in circuits)))
    print(f"\nset-up: AdamW lr {args.lr:g} eps {args.eps:g}, {args.steps} steps, weight decay {args.wd:g}; "
          f"graphs on {'the tuned task' if args.graph_data == 'task' else 'the mix'}")
    print("task | seed | overlaps (" + "/".join(short.values()) + ") | own strictly highest | lowest accuracy after")
    for task, seed, overlap, ok, low in rows:
        print(f"{task} | {seed} | {'/'.join(str(v) for v in overlap.values())} | {ok} | {low:.3f}")
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
