"""Peak memory and time of the circuit attribution scores (one forward and backward pass per batch,
``graph.circuits``' first step) on a GPT-2-small-shaped model: ``--prompts`` prompts of 20 random
tokens, ``find_circuits``' default batch of 64, in passes sized by ``routes.PASS_MEMORY``.

    python benchmarks/circuit_memory.py [--prompts 64] [--pass-gib 1]

``--pass-gib 1024`` runs the whole batch in one pass (as before the passes were bounded: ~9 GB more
at 64 prompts). The peak is the process's resident set from the start of the scores (Linux: VmHWM,
reset through /proc/self/clear_refs), the model and compression included (the "base"). Run each
budget in its own process: the allocator keeps what an earlier pass freed.
"""

from __future__ import annotations

import argparse
import time

import torch
from _peak import peak_gb, reset_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--pass-gib", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular import circuits
    from tl_modular.graph import routes
    from tl_modular.segmentation import segment
    from tl_modular.testing import gpt2_small_model

    model = gpt2_small_model(seed=0)
    tokens = torch.randint(0, 50257, (args.prompts, 20), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens, batch_size=8, progress=False)
    graph = tlm.build_graph(comp, model=model)
    channels = segment(model)
    all_routes = sorted(graph.routes("static"))
    writers = {w.name: w for w in routes.writers(comp, channels)}
    cat = circuits._category("all", tokens, model, channels, sorted({w for w, _ in all_routes}), writers, "mean")
    routes.PASS_MEMORY = int(args.pass_gib * 2 ** 30)
    rows = min(64, routes.rows_per_pass(model, len(writers), len(routes.readers(comp, model)), tokens.shape[1]))
    base = reset_peak()
    start = time.perf_counter()
    scores = circuits._scores(model, channels, graph, cat, all_routes, 64, chunk=64)
    print(f"{args.prompts} prompts x 20 tokens, {rows} rows per pass: scores {tuple(scores.shape)} in "
          f"{time.perf_counter() - start:.1f} s, peak {peak_gb():.2f} GB (base {base:.2f} GB), "
          f"sum of |scores| {abs(scores).sum():.9e}")


if __name__ == "__main__":
    main()
