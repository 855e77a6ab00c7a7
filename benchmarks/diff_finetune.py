"""Diff the bundled model against a copy fine-tuned briefly on one task: do the top changed routes
lie in that task's circuit more than in any other task's?

    .venv/bin/python benchmarks/diff_finetune.py [--task induction] [--steps 40] [--top 10]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import tl_modular as tlm
from tl_modular import toy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="all")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--graph-data", choices=("mix", "task"), default="mix",
                   help="build the diffed graphs on the four-task mix, or on the tuned task's own prompts")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = toy.load_model()
    tokens, mask, scored = toy.mixed_tokens(n_per_task=64, seed=2, scored=True)

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
    rows = []
    for task in chosen:
        t1 = time.perf_counter()
        tuned = copy.deepcopy(model)
        data = toy.GENERATORS[task](2000, seed=77) if task != "modular_addition" else \
            toy.modular_addition(2000, seed=77, split="train")
        toy.train(tuned, data, steps=args.steps, warmup=0, lr=args.lr, weight_decay=args.wd, eval_every=10_000,
                  progress=False)
        if args.graph_data == "task":   # route strengths measured where the fine-tune acted
            prompts = toy.GENERATORS[task](128, seed=9)
            d = tlm.diff(graph_on(model, prompts), graph_on(tuned, prompts), names=("original", f"tuned on {task}"))
        else:
            d = tlm.diff(ga, graph_of(tuned), names=("original", f"tuned on {task}"))
        keys = {"delta": lambda r: -abs(r.delta), "relative": lambda r: -abs(r.relative),
                "chi": lambda r: -abs(r.delta) / max(abs(r.share_a), abs(r.share_b), 1e-300) ** 0.5}
        for kname, key in keys.items():
            t = {r.route for r in sorted(d.routes, key=key)[:args.top]}
            print(f"   rank by {kname}: overlap", {k: len(t & set(c.routes)) for k, c in circuits.items()})
        top = {r.route for r in d.top_routes(args.top)}
        overlap = {k: len(top & set(c.routes)) for k, c in circuits.items()}
        # the same, normalized by circuit size (a larger circuit overlaps more by chance)
        frac = {k: overlap[k] / max(c.size, 1) for k, c in circuits.items()}
        best = max(overlap, key=overlap.get)
        print(f"tuned on {task:>16} ({time.perf_counter() - t1:.1f}s): top-{args.top} overlap {overlap}; "
              f"per circuit route {({k: round(v, 3) for k, v in frac.items()})}; "
              f"top channels {[(c.channel, c.side, round(c.max_angle, 1)) for c in d.top_channels(4)]}")
        rows.append((task, overlap, best == task and all(overlap[k] < overlap[task] for k in overlap if k != task)))
    print("task | overlap with own circuit | max overlap with another circuit | own strictly highest")
    for task, overlap, ok in rows:
        print(f"{task} | {overlap[task]} | {max(v for k, v in overlap.items() if k != task)} | {ok}")
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
