"""Peak memory and time of ``build_graph``'s data pass on a GPT-2-small-shaped model, in passes of
``routes.rows_per_pass`` rows (the default, ``PASS_MEMORY`` 1 GiB: one row at this shape), of two rows
(2 GiB) and in one pass over the whole batch (as before the passes were bounded), with the largest
difference of the route strengths.

    python benchmarks/graph_memory.py [--rows 4] [--threads 1]

Random GPT-2-small weights, ``--rows`` rows of 129 random tokens (compressed on the same rows, not
timed). The peak is the process's resident set from the start of each pass (Linux: VmHWM, reset
through /proc/self/clear_refs), so it includes the model and the compression (the "base"); the
variants run in order of their memory, as the allocator keeps what an earlier pass freed.
The one-pass variant needs ~1.1 GB per row above the base: keep ``--rows`` small on a busy machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from _peak import peak_gb, reset_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular.graph import routes
    from tl_modular.testing import gpt2_small_model

    model = gpt2_small_model(seed=0)
    tokens = torch.randint(0, 50257, (args.rows, 129), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens, batch_size=8, progress=False)
    tlm.build_graph(comp, model=model, tokens=tokens[:1], progress=False)   # warm: first-call costs
    ref = None
    default = routes.PASS_MEMORY
    for name, budget in ((f"passes of {routes.rows_per_pass(model, 158, 445, 129)} row(s) (default)", default),
                         ("passes of 2 rows", 2 << 30), (f"one pass of {args.rows} rows (before)", 1 << 50)):
        routes.PASS_MEMORY = budget
        base = reset_peak()
        start = time.perf_counter()
        graph = tlm.build_graph(comp, model=model, tokens=tokens, batch_size=args.rows, progress=False)
        seconds = time.perf_counter() - start
        data = torch.tensor([d["data"] for *_, d in sorted(graph.nx.edges(data=True)) if d["kind"] == "route"],
                            dtype=torch.float64)
        diff = 0.0 if ref is None else float((data - ref).abs().max() / ref.abs().max())
        ref = data if ref is None else ref
        print(f"{name}: {seconds:.1f} s, peak {peak_gb():.2f} GB (base {base:.2f} GB), "
              f"largest difference {diff:.1e} of the largest strength", flush=True)
    routes.PASS_MEMORY = default


if __name__ == "__main__":
    main()
