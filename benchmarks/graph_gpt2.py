"""``tlm.build_graph`` + modules + null model on a GPT-2-small-shaped model, networkx vs igraph.

    python benchmarks/graph_gpt2.py [--tokens 2048] [--threads 2] [--n-null 100] [--n-null-networkx 5]

Random GPT-2-small weights (the architecture sets the cost): 156 head and MLP channels, 12·12·3 + 12
reader ports, ~29k routes. Compresses on ``--tokens`` random tokens (not timed here; see
``compress_gpt2.py``), then measures in one run: the static graph, the data strengths (one forward and
one backward pass per batch, against plain forward+backward passes over the same batches), the
Gomory–Hu modules with each backend, and the permutation null model (``--n-null`` samples with
igraph; networkx is timed on ``--n-null-networkx`` samples and its per-sample time reported).
"""

from __future__ import annotations

import argparse
import resource
import statistics as stats
import time

import torch


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return stats.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-null", type=int, default=100)
    parser.add_argument("--n-null-networkx", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular.testing import gpt2_small_model

    model = gpt2_small_model(seed=0)
    seq = 129
    tokens = torch.randint(0, 50257, (args.tokens // (seq - 1), seq), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens, batch_size=args.batch_size, progress=False)

    def forward_backward():
        for batch in tokens.split(args.batch_size):
            model(batch, return_type="loss").backward()
        model.zero_grad(set_to_none=True)

    fb, _ = timed(forward_backward)
    static_t, static = timed(lambda: tlm.build_graph(comp, model=model))
    data_t, graph = timed(lambda: tlm.build_graph(comp, model=model, tokens=tokens, batch_size=args.batch_size,
                                                  progress=False))
    routes = len(graph.routes())
    print(f"{comp.n_tokens} tokens, {len(comp)} channels, {routes} routes, threads={args.threads}")
    print(f"static graph: {static_t:.1f} s")
    print(f"data graph: {data_t:.1f} s = {data_t / fb:.2f}x plain forward+backward ({fb:.1f} s)")
    for backend in ("igraph", "networkx"):
        t, modules = timed(lambda b=backend: graph.modules(backend=b))
        sizes = sorted(map(len, modules), reverse=True)
        print(f"modules ({backend}): {t:.2f} s, {len(modules)} modules, sizes {sizes}")
    n_null = {"igraph": args.n_null, "networkx": args.n_null_networkx}
    for backend, n in n_null.items():
        t, result = timed(lambda b=backend, n=n: graph.modularity(n_null=n, backend=b, progress=False))
        print(f"null model ({backend}, {n} samples): {t:.1f} s = {t / n:.2f} s per sample; "
              f"Q {result['Q']['value']:.3f} (null {result['Q']['null_mean']:.3f}, p {result['Q']['p']:.3f})")
    print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB")
    print(static)


if __name__ == "__main__":
    main()
