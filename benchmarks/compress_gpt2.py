"""``tlm.compress`` on a GPT-2-small-shaped model (12 layers, 156 head and MLP channels).

    python benchmarks/compress_gpt2.py [--tokens 16384] [--threads 2] [--statistic fisher|jacobian]

Random GPT-2-small weights (the architecture is what sets the cost), random tokens in rows of
128 (+1 for position 0). Measures, in one run: the plain forward passes over the same batches,
the statistics pass with its breakdown (forward with caching, input moments, head statistics,
MLP statistics), building the bases, the ratio statistics / forward, and peak memory.
``--statistic fisher`` (the default of ``tlm.compress``) times the one pass that ``read="fisher",
write="fisher"`` needs instead: forward, backward to the hooked activations with labels sampled
from the model, and the input and write moments; ``jacobian`` the exact Jacobian moments that
``read="whitened"|"jacobian"|"rrr"`` and ``write="jacobian"`` need.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--statistic", choices=["fisher", "jacobian"], default="fisher")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular.compression.fisher import collect_fisher
    from tl_modular.compression.statistics import collect_statistics
    from tl_modular.testing import gpt2_small_model

    model = gpt2_small_model(seed=0)
    seq = 129
    tokens = torch.randint(0, 50257, (args.tokens // (seq - 1), seq), generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    with torch.no_grad():
        for batch in tokens.split(args.batch_size):
            model(batch)
    forward = time.perf_counter() - start

    start = time.perf_counter()
    if args.statistic == "fisher":
        fisher = collect_fisher(model, tokens, batch_size=args.batch_size, moments=True)
        stats = fisher.statistics
    else:
        stats = collect_statistics(model, tokens, batch_size=args.batch_size)
    statistics_time = time.perf_counter() - start
    start = time.perf_counter()
    if args.statistic == "fisher":
        comp = tlm.compress(model, fisher=fisher, read="fisher", write="fisher")
    else:
        comp = tlm.compress(model, statistics=stats, read="whitened", write="output")
    bases = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    t = stats.timings
    print(f"{stats.n_tokens} tokens, {len(comp)} channels, threads={args.threads}, statistic={args.statistic}")
    print(f"plain forward passes: {forward:.1f} s")
    print(f"statistics: {statistics_time:.1f} s = {statistics_time / forward:.2f}x forward "
          f"({', '.join(f'{k} {v:.1f}' for k, v in t.items())})")
    print(f"bases: {bases:.1f} s   total compress: {statistics_time + bases:.1f} s   peak memory: {peak_gb:.2f} GB")
    print(comp)


if __name__ == "__main__":
    main()
