"""Data-parallel statistics under torch.distributed: 1 process vs N processes on this machine.

    python benchmarks/distributed.py [--tokens 32768] [--nproc 2] [--threads 1] [--pass statistics|fisher]

GPT-2-small shape with random weights (``tl_modular.testing.gpt2_small_model``; the architecture
sets the cost), random tokens in rows of 129 (position 0 excluded: 128 counted per row). Runs the
pass ``tlm.compress`` makes by default (``statistics``: the exact Jacobian moments, inputs and
writes) or the one of ``compress(read="fisher")`` (``fisher``: one forward and backward pass per
batch with the input and write moments), first in one
spawned process, then in ``--nproc`` spawned processes joined by a gloo process group (each takes
its shard of the batches; the sums are all-reduced in float64). Prints, side by side: wall time of
the pass (the slowest rank), tokens/s, peak resident memory per process, and the largest relative
difference of every moment from the single-process run; then a projection to GPT-2-XL over 10M
tokens on 8 GPUs from the measured tokens/s per process.

Processes pin ``--threads`` torch threads each: on a 2-core machine, 1 process × 1 thread vs
2 processes × 1 thread uses the same cores as 1 process × 2 threads would.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch
import torch.multiprocessing as mp

SEQ = 129


def _worker(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                                             world_size=world)
    from tl_modular import _dist
    from tl_modular.compression.fisher import collect_fisher
    from tl_modular.compression.statistics import collect_statistics
    from tl_modular.testing import gpt2_small_model

    # time spent in the collectives (the all-reduce and the consistency check) vs the local work
    spent = {"collectives": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent["collectives"] += time.perf_counter() - t
        return wrapper

    _dist.all_reduce = timed(_dist.all_reduce)
    _dist.check_consistent = timed(_dist.check_consistent)
    model = gpt2_small_model(seed=0)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.tokens // (SEQ - 1), SEQ),
                           generator=torch.Generator().manual_seed(0))
    if world > 1:
        torch.distributed.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    if args.pass_ == "fisher":
        fisher = collect_fisher(model, tokens, batch_size=args.batch_size, moments=True, progress=False)
        stats = fisher.statistics
        result = {**{f"fisher:{k}": v for k, v in fisher.writes.items()},
                  **{f"fisher:{c}:{p}": v for (c, p), v in fisher.ports.items()}}
    else:
        stats = collect_statistics(model, tokens, batch_size=args.batch_size, progress=False)
        result = {f"read:{c}:{p}": s.jacobian for c, ps in stats.reads.items() for p, s in ps.items()}
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    result.update({f"in:{h}": s.cov for h, s in stats.inputs.items()})
    result.update({f"write:{c}": w.cov for c, w in stats.writes.items()})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    torch.save({"seconds": seconds, "cpu": cpu, "collectives": spent["collectives"], "peak_gb": peak,
                "n_tokens": stats.n_tokens, "batches": -(-len(tokens) // args.batch_size),
                "result": result if rank == 0 else None},
               os.path.join(out, f"w{world}r{rank}.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


def _run(world: int, args: argparse.Namespace, out: str) -> list[dict]:
    mp.spawn(_worker, args=(world, args, out), nprocs=world, join=True)
    return [torch.load(os.path.join(out, f"w{world}r{r}.pt"), weights_only=False) for r in range(world)]


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for k, x in a.items():
        y = b[k]
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-300)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pass", dest="pass_", choices=["statistics", "fisher"], default="statistics")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlm-bench-dist-") as out:
        one = _run(1, args, out)
        many = _run(args.nproc, args, out)
    t1 = one[0]["seconds"]
    tn = max(r["seconds"] for r in many)
    n_tokens = one[0]["n_tokens"]
    diff = _max_rel(one[0]["result"], many[0]["result"])
    print(f"GPT-2-small shape, {args.pass_} pass, {n_tokens} tokens ({one[0]['batches']} batches of "
          f"{args.batch_size} x {SEQ}), {args.threads} thread(s) per process, gloo")
    print("| processes | wall time of the pass | tokens/s | speed-up | CPU time per process | of which collectives "
          "| peak memory per process | max relative difference from 1 process |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1 | {t1:.1f} s | {n_tokens / t1:.0f} | 1.00x | {one[0]['cpu']:.1f} s | {one[0]['collectives']:.1f} s "
          f"| {one[0]['peak_gb']:.2f} GB | (reference) |")

    def each(key: str, fmt: str) -> str:
        return ", ".join(format(r[key], fmt) for r in many)
    print(f"| {args.nproc} | {tn:.1f} s | {n_tokens / tn:.0f} | {t1 / tn:.2f}x | {each('cpu', '.1f')} s | "
          f"{each('collectives', '.1f')} s | {each('peak_gb', '.2f')} GB | {diff:.1e} |")
    # Projection: the pass costs ~ tokens x n_layers x d_model^2 (every moment is a per-layer
    # product of d_model- or d_mlp-sized activations); GPT-2-XL (48 x 1600^2) / small (12 x 768^2)
    ratio = (48 * 1600 ** 2) / (12 * 768 ** 2)
    per_proc = n_tokens / t1                      # tokens/s of one process of this run
    xl = per_proc / ratio
    print(f"\nProjection: one process here does {per_proc:.0f} tokens/s on GPT-2-small, so ~{xl:.1f} tokens/s on "
          f"GPT-2-XL (cost x{ratio:.1f}, n_layers x d_model^2); 10M tokens take {1e7 / xl / 3600:.0f} h in one such "
          f"process, {1e7 / xl / 3600 / 8:.0f} h over 8 such processes at linear scaling (the all-reduce is "
          "once per pass, a few hundred MB of float64 for GPT-2-XL: seconds). A GPU process is faster by the "
          "GPU/CPU throughput ratio of this pass, not measured here.")


if __name__ == "__main__":
    main()
