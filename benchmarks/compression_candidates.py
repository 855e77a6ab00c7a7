"""Which statistic compresses best? Dimensions needed for 95% CE loss recovered on the bundled model.

    python benchmarks/compression_candidates.py [--target 0.95] [--threads 2]

Statistics are collected once on a mix of the four tasks' prompts; every (read, write)
candidate is built from them and the smallest total budget reaching the target CE loss
recovered (on held-out prompts of the mix) is found by bisection. The candidate needing the
fewest dimensions is ``tlm.compress``'s default.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-per-task", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular import toy
    from tl_modular.compression.statistics import collect_statistics

    model = toy.load_model()
    tokens, mask = toy.mixed_tokens(n_per_task=args.n_per_task, seed=0)
    held, held_mask = toy.mixed_tokens(n_per_task=256, seed=1000)
    start = time.perf_counter()
    stats = collect_statistics(model, tokens, attention_mask=mask, progress=False)
    print(f"statistics on {stats.n_tokens} tokens: {time.perf_counter() - start:.1f} s")

    def recovered(comp, budget):
        return comp.truncated(budget=budget).fidelity(model, held, attention_mask=held_mask)["loss_recovered"]

    rows = []
    for read in ("jacobian", "whitened", "rrr"):
        for write in ("output", "jacobian"):
            comp = tlm.compress(model, statistics=stats, read=read, write=write)
            lo, hi = 0, comp.max_total_rank
            while lo < hi:  # smallest budget reaching the target (recovery grows with the budget)
                mid = (lo + hi) // 2
                if recovered(comp, mid) >= args.target:
                    hi = mid
                else:
                    lo = mid + 1
            rows.append((lo, read, write, comp.max_total_rank))
            print(f"read={read:9s} write={write:9s} dimensions for {args.target:.0%}: {lo:4d} of {comp.max_total_rank}",
                  flush=True)
    best = min(rows)
    print(f"best: read={best[1]} write={best[2]} with {best[0]} of {best[3]} dimensions")


if __name__ == "__main__":
    main()
