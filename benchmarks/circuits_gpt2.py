"""``graph.circuits`` for the four GPT-2 prompt sets on a GPT-2-small-shaped model.

    python benchmarks/circuits_gpt2.py [--prompts 32] [--threads 2] [--search greedy|mask] [--sets ioi,...]

Random GPT-2-small weights (the architecture sets the cost; the circuits themselves mean nothing),
prompt sets from ``tlm.tasks`` with the real GPT-2 tokenizer (``../shared/data/gpt2-tokenizer`` by
default). Compresses on 2,048 random tokens and builds the static graph (not timed here; see
``graph_gpt2.py``), then times ``graph.circuits`` on IOI, greater-than, docstring and induction:
attribution scores, the verified faithfulness curve (geometric grid + bisection), bootstrap
intervals and 3 random circuits each, without pruning. ``--search mask`` adds the learnt relaxed
mask (60 forward and backward passes per set) before growing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--search", choices=("greedy", "mask"), default="greedy")
    parser.add_argument("--sets", default="ioi,greater_than,docstring,induction")
    parser.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                                   / "gpt2-tokenizer"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    import tl_modular as tlm
    from tl_modular.testing import gpt2_small_model

    tok = AutoTokenizer.from_pretrained(args.tokenizer, add_bos_token=True)
    model = gpt2_small_model(seed=0)
    tokens = torch.randint(0, 50257, (16, 129), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens, batch_size=8, progress=False)
    graph = tlm.build_graph(comp, model=model)
    tasks = {name: getattr(tlm.tasks, name)(tok, args.prompts, seed=0)
             for name in args.sets.split(",")}
    print(f"{len(graph.routes())} routes, {args.prompts} prompts per set, threads={args.threads}, "
          f"search={args.search}", flush=True)
    times = []
    for name, task in tasks.items():
        start = time.perf_counter()
        c = graph.circuits(model, {name: task}, search=args.search, prune=False, n_random=3, n_boot=100,
                           batch_size=args.prompts, progress=False)[name]
        times.append(time.perf_counter() - start)
        print(f"{name:>13}: {times[-1]:.1f} s; {tuple(task.clean.shape)} tokens; {c.size} routes "
              f"(from the {c.search} order), faithfulness {c.faithfulness:.2f}, "
              f"{len(c.curve)} curve points", flush=True)
    print(f"four prompt sets: {sum(times):.1f} s ({sum(times) / len(times):.1f} s per set)")


if __name__ == "__main__":
    main()
